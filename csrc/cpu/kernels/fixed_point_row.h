// Fixed-point inverse-CDF sampling over one probability row on the CPU (see core/acceptance.h for why
// fixed point), compiled per ISA (cpu/vec.h): kW tokens per step, then a scalar tail, with identical results.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/acceptance.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN

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
    int64_t t = begin;
    VecU64Sum acc = VecU64Sum::zero();
    Vec::Mask bad{};
    for (; t + kW <= end; t += kW) {
      const Vec pv = Vec::load(p + t);
      bad = bad | not_prob(pv);
      if (q) {
        const Vec qv = Vec::load(q + t);
        bad = bad | not_prob(qv);
        acc = acc + fixed_weights(pv - qv);
      } else {
        acc = acc + fixed_weights(pv);
      }
    }
    uint64_t total = hsum(acc);
    bool good = !any_lane(bad);
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

// The token at which the inclusive prefix sum of weight(t) over [0, V) first exceeds sample_target(bits, total):
// block_sum(begin, end) sums whole blocks (vectorised, equal to the scalar sum), then one block is walked.
template <typename BlockSum, typename Weight>
int64_t sample_by_blocks(int64_t V, uint64_t bits, std::vector<uint64_t>& sums, BlockSum block_sum, Weight weight) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  sums.assign(blocks, 0);
  uint64_t total = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    sums[blk] = block_sum(blk * kBlock, std::min(V, (blk + 1) * kBlock));
    total += sums[blk];
  }
  uint64_t target = accept::sample_target(bits, total);
  int64_t blk = 0;
  while (target >= sums[blk]) target -= sums[blk++];
  uint64_t cum = 0;
  for (int64_t t = blk * kBlock;; ++t) {
    cum += weight(t);
    if (cum > target) return t;
  }
}

FASTAR_ISA_END
