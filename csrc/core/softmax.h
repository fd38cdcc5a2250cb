// The online softmax of fastar's attention kernels (FlashAttention's recurrence), shared by the CPU and CUDA
// kernels: one row's state after some of its keys, updated tile by tile, merged across key splits, finalised.
//
// State: m, the max of the logits seen (-inf: none yet), and l, the sum of exp(logit - m). Conventions:
//  * NaN in, NaN out: the max propagates NaN, so a NaN logit (or a +inf one: exp(inf - inf)) makes m or l NaN
//    and the row's output and LSE NaN.
//  * A row that saw no key (m = -inf, l = 0) finalises to output 0 and LSE -inf.
//  * The LSE is the natural log, whatever the units of the logits (Units below).
// Templates over the value type V: float, or (CPU) a SIMD vector holding one row per lane. A vector type
// brings its own overloads of the softmax_* primitives, declared in its namespace (found by ADL) or before
// this header is included; softmax_is_neg_inf may return the type's mask, which its softmax_where takes.
#pragma once
#include <cmath>

#include "core/macros.h"

namespace fastar {

// max(a, b) that propagates NaN (fmaxf and std::max drop or keep it depending on the side).
FASTAR_HD float softmax_max(float a, float b) { return a > b || a != a ? a : b; }
FASTAR_HD float softmax_exp(float x) { return expf(x); }
FASTAR_HD float softmax_exp2(float x) { return exp2f(x); }
FASTAR_HD float softmax_log(float x) { return logf(x); }
FASTAR_HD float softmax_log2(float x) { return log2f(x); }
FASTAR_HD bool softmax_is_neg_inf(float x) { return x == -INFINITY; }
FASTAR_HD bool softmax_is_zero(float x) { return x == 0.0f; }
FASTAR_HD float softmax_where(bool c, float a, float b) { return c ? a : b; }

#include "core/softmax_state.inc"  // NOLINT: included inside the namespace

}  // namespace fastar
