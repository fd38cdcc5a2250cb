// Math of fastar.sample_cfg shared by the CPU kernel and the CUDA kernel, so that the same seed gives the same
// token on every backend.
//
// Exactness across backends: every float operation on the way to a token is one IEEE-rounded operation that
// all backends compute alike (fma, add, multiply, round-to-nearest-even; no library exp, no summation order):
//   guided logit  x = fma(cond_w, cond, uncond_w * uncond)     (guidance and temperature folded in two weights)
//   weight        w = fixed_weight(exp_nonpositive(x - max))    (40-bit fixed point, see core/acceptance.h)
// and everything after that (top-k count, top-p mass, inverse CDF) is integer arithmetic on uint64 sums.
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>

#include "core/acceptance.h"
#include "core/macros.h"
#include "core/philox.h"

namespace fastar::sampling {

// Status of one (row, position); the CPU op raises for it, the CUDA op writes token -1.
enum Status : int32_t {
  kOk = 0,
  kBadValue = 4,       // a guided logit is NaN or +inf (NaN input, or inf - inf in the mix)
  kNoFiniteLogit = 8,  // every guided logit is -inf
};

FASTAR_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FASTAR_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

FASTAR_HD float guided_logit(float cond, float uncond, float cond_w, float uncond_w) {
  return fmaf(cond_w, cond, uncond_w * uncond);
}

// exp(x) for x <= 0 (relative error ~2e-7), the same operations as exp in cpu/vec.h so the vectorised CPU
// path gives identical bits: 2^n e^r, n = rint(x / ln2), r by a two-constant Cody-Waite reduction, e^r by a
// degree-6 polynomial. Below -87.3 (and -inf) it is exactly 0.
FASTAR_HD float exp_nonpositive(float x) {
  if (!(x >= -87.3f)) return 0.0f;
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(-n, 0.693359375f, x);
  r = fmaf(-n, -2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = fmaf(y, r, 1.3981999507e-3f);
  y = fmaf(y, r, 8.3334519073e-3f);
  y = fmaf(y, r, 4.1665795894e-2f);
  y = fmaf(y, r, 1.6666665459e-1f);
  y = fmaf(y, r, 5.0000001201e-1f);
  y = fmaf(y, r * r, r + 1.0f);
  return y * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// Fixed-point weight of a token with guided logit x in a row whose maximum is max.
FASTAR_HD uint64_t token_weight(float x, float max) { return accept::fixed_weight(exp_nonpositive(x - max)); }

// Order-preserving map of a non-NaN float to uint32 (larger float, larger key); -0 and +0 share a key, so keys
// compare as the floats do. The CUDA kernel selects thresholds by radix over these keys.
FASTAR_HD uint32_t order_key(float x) {
  uint32_t u = float_bits(x);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of an order key (the inverse of order_key; -0 comes back as +0).
FASTAR_HD float key_float(uint32_t key) { return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key); }

// The top-p cut in fixed point: with top_p_fixed = ceil(top_p * 2^64), ceil(top_p * total). A token is dropped
// when the mass of the tokens with a larger logit reaches it, i.e. kept tokens are those >= the largest logit T
// whose mass of logits >= T reaches it (VAR's `cumsum(ascending) <= 1 - top_p` removes a token exactly when the
// mass above it is >= top_p). It is >= 1, so T always exists and the argmax is always kept.
FASTAR_HD uint64_t top_p_target(uint64_t top_p_fixed, uint64_t total) {
  return accept::mulhi64(top_p_fixed, total) + (top_p_fixed * total != 0 ? 1 : 0);
}

}  // namespace fastar::sampling

namespace fastar {

// Arguments of one launch, filled by csrc/ops/sample_cfg_args.h. Logits are typed by the kernel (float, half or
// bfloat16); strides in elements, the V-stride is 1. Row (b, l) mixes logits[b, l] and logits[B + b, l].
struct SampleCfgParams {
  const void* logits;  // [2B, L, V]
  int64_t s_row, s_pos;
  int64_t* tokens;  // [B, L]
  int64_t B, L, V;
  float cond_w, uncond_w;  // guided logit = cond_w * cond + uncond_w * uncond (temperature folded in)
  int64_t top_k;           // in [1, V), or 0: no top-k
  uint64_t top_p_fixed;    // ceil(top_p * 2^64), or 0: no top-p
  PhiloxSeed seed;         // the sampling bits of (b, l) are accept::draw(seed, b, l).sample_bits
};

}  // namespace fastar
