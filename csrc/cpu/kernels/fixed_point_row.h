// Fixed-point inverse-CDF sampling over one probability row on the CPU (see core/acceptance.h for why
// fixed point), compiled per ISA (cpu/vec.h). AVX2 and AVX-512 do 8 tokens per step; the generic build takes
// the scalar loop, with identical results.
#pragma once
#include <cstdint>

#include "core/acceptance.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN

#if FASTAR_ISA_LEVEL >= 1
// fixed_weight of 8 floats, lanes 0-3 in *lo and 4-7 in *hi (uint64); the same round-via-2^52 trick as the
// scalar code.
inline void fixed8(__m256 w, __m256i* lo, __m256i* hi) {
  w = _mm256_max_ps(w, _mm256_setzero_ps());  // NaN -> 0, as in fixed_weight
  const __m256d scale = _mm256_set1_pd(accept::kFixedScale), magic = _mm256_set1_pd(accept::kRoundMagic);
  const __m256i magic_bits = _mm256_set1_epi64x(static_cast<int64_t>(accept::kRoundMagicBits));
  const __m256d l = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)), scale), magic);
  const __m256d h = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), scale), magic);
  *lo = _mm256_sub_epi64(_mm256_castpd_si256(l), magic_bits);
  *hi = _mm256_sub_epi64(_mm256_castpd_si256(h), magic_bits);
}

// acc (4 x uint64) += fixed_weight of 8 floats.
inline __m256i add_fixed8(__m256i acc, __m256 w) {
  __m256i lo, hi;
  fixed8(w, &lo, &hi);
  return _mm256_add_epi64(_mm256_add_epi64(acc, lo), hi);
}

inline __m256 prob_ok8(__m256 x) {  // all-ones lanes where 0 <= x <= 1 (false for NaN)
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ),
                       _mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_LE_OQ));
}

inline uint64_t hsum_u64(__m256i v) {
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#endif

// Weights fixed_weight(p - q) (residual), or fixed_weight(p) when q is null; `excluded` (-1: none) has
// weight 0 (the residual against a one-hot draft distribution).
template <typename P>
struct FixedRow {
  const P* p;
  const P* q;
  int64_t excluded;

  uint64_t weight(int64_t t) const {
    if (t == excluded) return 0;
    const float pt = static_cast<float>(p[t]);
    return q ? accept::residual_weight(pt, static_cast<float>(q[t])) : accept::fixed_weight(pt);
  }

  // Sum of the weights over [begin, end); *ok = every p (and q) value read is a probability.
  uint64_t sum(int64_t begin, int64_t end, bool* ok) const {
    uint64_t total = 0;
    bool good = true;
    int64_t t = begin;
#if FASTAR_ISA_LEVEL >= 1
    __m256i acc = _mm256_setzero_si256();
    __m256 valid = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (; t + 8 <= end; t += 8) {
      const __m256 pv = Vec8::load(p + t).v;
      valid = _mm256_and_ps(valid, prob_ok8(pv));
      if (q) {
        const __m256 qv = Vec8::load(q + t).v;
        valid = _mm256_and_ps(valid, prob_ok8(qv));
        acc = add_fixed8(acc, _mm256_sub_ps(pv, qv));
      } else {
        acc = add_fixed8(acc, pv);
      }
    }
    total = hsum_u64(acc);
    good = _mm256_movemask_ps(valid) == 0xff;
#endif
    for (; t < end; ++t) {
      const float pt = static_cast<float>(p[t]);
      good &= accept::prob_ok(pt);
      if (q) {
        const float qt = static_cast<float>(q[t]);
        good &= accept::prob_ok(qt);
        total += accept::residual_weight(pt, qt);
      } else {
        total += accept::fixed_weight(pt);
      }
    }
    if (excluded >= begin && excluded < end) total -= weight_without_exclusion(excluded);
    *ok = good;
    return total;
  }

  // The first token whose inclusive prefix sum exceeds target (< the row's total): skip whole blocks by
  // their sums, then walk one block.
  int64_t find(int64_t V, uint64_t target) const {
    constexpr int64_t kBlock = 256;
    uint64_t cum = 0;
    bool ok = true;
    for (int64_t begin = 0; begin < V; begin += kBlock) {
      const int64_t end = begin + kBlock < V ? begin + kBlock : V;
      const uint64_t s = sum(begin, end, &ok);
      if (cum + s <= target) {
        cum += s;
        continue;
      }
      for (int64_t t = begin; t < end; ++t) {
        cum += weight(t);
        if (cum > target) return t;
      }
    }
    return V - 1;  // unreachable for target < total
  }

 private:
  uint64_t weight_without_exclusion(int64_t t) const {
    const float pt = static_cast<float>(p[t]);
    return q ? accept::residual_weight(pt, static_cast<float>(q[t])) : accept::fixed_weight(pt);
  }
};

FASTAR_ISA_END
