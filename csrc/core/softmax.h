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

// The base of the logits a state is fed: e, or 2 (log2(e) folded into the softmax scale: exp is one exp2).
struct NaturalUnits {
  template <typename V>
  FASTAR_HD static V exp(V x) {
    return softmax_exp(x);
  }
  template <typename V>
  FASTAR_HD static V log(V x) {
    return softmax_log(x);
  }
  static constexpr float kToNatural = 1.0f;
};

struct Log2Units {
  template <typename V>
  FASTAR_HD static V exp(V x) {
    return softmax_exp2(x);
  }
  template <typename V>
  FASTAR_HD static V log(V x) {
    return softmax_log2(x);
  }
  static constexpr float kToNatural = 0.6931471805599453f;  // ln 2
};

template <typename V, typename Units = NaturalUnits>
struct SoftmaxState {
  V m;  // max of the logits seen: -inf before any, NaN after a NaN
  V l;  // sum of exp(logit - m) over them

  // The weights of two accumulated outputs in a merge: out = out * self + other_out * other.
  struct MergeWeights {
    V self, other;
  };

  FASTAR_HD static SoftmaxState init() { return SoftmaxState{V(-INFINITY), V(0.0f)}; }

  // The factor that takes a sum relative to max `from` to max `to` (from <= to): 0 when from = -inf, so a
  // state that saw nothing adds nothing (not exp(-inf + inf) = NaN).
  FASTAR_HD static V rescale(V from, V to) {
    return softmax_where(softmax_is_neg_inf(from), V(0.0f), Units::exp(from - to));
  }

  // Takes in a tile whose visible logits have max tile_max (-inf: none). Returns the factor the caller
  // multiplies its accumulated output by; the caller then adds the tile's prob(s) to l (add).
  FASTAR_HD V update(V tile_max) {
    const V m_new = softmax_max(m, tile_max);
    const V corr = rescale(m, m_new);
    l = l * corr;
    m = m_new;
    return corr;
  }

  // What the logits are shifted by: m, or 0 while m = -inf (so a hidden logit's exp(-inf - 0) is 0).
  FASTAR_HD V shift() const { return softmax_where(softmax_is_neg_inf(m), V(0.0f), m); }

  // exp(s - m), the probability of logit s before normalisation (after update).
  FASTAR_HD V prob(V s) const { return Units::exp(s - shift()); }

  FASTAR_HD void add(V p) { l = l + p; }

  // Folds in another partial state of the same row (kv splits, key slices).
  FASTAR_HD MergeWeights merge(const SoftmaxState& other) {
    const V m_new = softmax_max(m, other.m);
    const MergeWeights w{rescale(m, m_new), rescale(other.m, m_new)};
    l = l * w.self + other.l * w.other;
    m = m_new;
    return w;
  }

  // 1 / l, the factor of the accumulated output: 0 for a row that saw no key (l = 0), NaN for a NaN l (also
  // when a tile max that dropped a NaN logit left m at -inf: the NaN is in l).
  FASTAR_HD V inv_l() const { return softmax_where(softmax_is_zero(l), V(0.0f), V(1.0f) / l); }

  // The natural-log LSE: -inf for a row that saw no key, NaN for a NaN row.
  FASTAR_HD V lse() const { return (m + Units::log(l)) * V(Units::kToNatural); }
};

}  // namespace fastar
