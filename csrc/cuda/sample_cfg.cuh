// CUDA kernel of fastar.sample_cfg: one block per (image, position). The guided logits are recomputed from the
// two input rows at every pass (they stay in L1/L2), never sorted:
//  1. the block finds the maximum (and NaN / +inf / all -inf rows, marked with token -1);
//  2. the top-k threshold (the k-th largest logit) and the top-p threshold (the largest logit whose mass of
//     logits at or above it reaches ceil(top_p * total)) are radix selects over the logits' order keys, 8 bits
//     per pass, counting tokens or summing fixed-point weights in a shared 256-bin histogram (SplitSum bins:
//     native 32-bit atomics); the top-p select takes the kept tokens' total from its first histogram;
//  3. each warp sums the kept weights of a contiguous segment, thread 0 picks the segment holding the target,
//     and that warp scans it 32 tokens at a time. Integer sums make the token identical to the CPU kernel's.
#pragma once
#include "core/sampling.h"
#include "cuda/common.cuh"
#include "cuda/radix_select.cuh"

namespace fastar::cuda {

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) sample_cfg_kernel(SampleCfgParams prm) {
  using namespace sampling;
  constexpr int kWarps = kThreads / 32;
  __shared__ RadixSelectShared s_radix;
  __shared__ float s_warp_max[kWarps];
  __shared__ int s_warp_nan[kWarps];
  __shared__ unsigned long long s_warp_sum[kWarps];
  __shared__ float s_max;
  __shared__ int s_status;
  __shared__ int s_pick_warp;
  __shared__ unsigned long long s_pick_target;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x, b = row / prm.L, l = row % prm.L, V = prm.V;
  const P* cond = static_cast<const P*>(prm.logits) + b * prm.s_row + l * prm.s_pos;
  const P* uncond = cond + prm.B * prm.s_row;
  auto logit = [&](int64_t t) {
    return guided_logit(to_float(cond[t]), to_float(uncond[t]), prm.cond_w, prm.uncond_w);
  };

  float m = -INFINITY;
  bool nan = false;
  for (int64_t t = tid; t < V; t += kThreads) {
    const float x = logit(t);
    nan |= x != x;
    m = fmaxf(m, x);
  }
  m = warp_max(m);
  nan = __any_sync(kFullMask, nan);
  if (lane == 0) {
    s_warp_max[warp] = m;
    s_warp_nan[warp] = nan;
  }
  __syncthreads();
  if (tid == 0) {
    int any_nan = 0;
    for (int w = 0; w < kWarps; ++w) {
      m = fmaxf(m, s_warp_max[w]);
      any_nan |= s_warp_nan[w];
    }
    s_max = m;
    s_status = any_nan || m == INFINITY ? kBadValue : m == -INFINITY ? kNoFiniteLogit : kOk;
  }
  __syncthreads();
  if (s_status != kOk) {  // block-uniform: no thread reaches another barrier
    if (tid == 0) prm.tokens[row] = -1;
    return;
  }
  const float mx = s_max;

  uint32_t tau = 0;  // the smallest kept key (0: every token)
  if (prm.top_k > 0) {
    tau = block_radix_select<kThreads>(
        V, 0, [&](uint64_t) { return static_cast<uint64_t>(prm.top_k); },
        [&](int64_t t, uint32_t* key) {
          *key = order_key(logit(t));
          return uint64_t{1};
        },
        s_radix);
  }
  auto key_weight = [&](int64_t t, uint32_t* key) {
    const float x = logit(t);
    *key = order_key(x);
    return token_weight(x, mx);
  };
  auto kept_weight = [&](int64_t t) {
    uint32_t key;
    const uint64_t w = key_weight(t, &key);
    return key >= tau ? w : 0;
  };
  if (prm.top_p_fixed) {  // the kept tokens' total comes from the select's first histogram
    tau = block_radix_select<kThreads>(
        V, tau, [&](uint64_t total) { return top_p_target(prm.top_p_fixed, total); }, key_weight, s_radix);
  }

  int64_t begin, end;
  warp_segment<kWarps>(V, warp, &begin, &end);
  uint64_t sum = 0;
  for (int64_t t = begin + lane; t < end; t += 32) sum += kept_weight(t);
  sum = warp_sum(sum);
  if (lane == 0) s_warp_sum[warp] = sum;
  __syncthreads();
  if (tid == 0) {  // the total is > 0: the maximum is always kept, with weight 2^40
    uint64_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += s_warp_sum[w];
    uint64_t target = accept::sample_target(
        accept::draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(l)).sample_bits, total);
    int w = 0;
    while (target >= s_warp_sum[w]) target -= s_warp_sum[w++];
    s_pick_warp = w;
    s_pick_target = target;
  }
  __syncthreads();
  if (warp == s_pick_warp) {
    const int64_t t = warp_find_token(begin, end, s_pick_target, lane, kept_weight);
    if (lane == 0) prm.tokens[row] = t;
  }
}

}  // namespace fastar::cuda
