// CUDA kernel of fastar.speculative_sample and fastar.lantern_accept: one block per batch row.
//  1. Threads test the drafts in parallel (validation + the Leviathan/Chen or LANTERN test, core/lantern.h);
//     the first rejection is an atomicMin in shared memory.
//  2. The block samples the token at that position from the residual (or the bonus row): each warp sums
//     a contiguous segment of the row in fixed point, thread 0 picks the segment holding the target, and
//     that warp scans it 32 tokens at a time. Integer sums make the token identical to the CPU kernel's.
#pragma once
#include <climits>

#include "cuda/common.cuh"

namespace fastar::cuda {

// Weights of the row to sample from, as in the CPU kernel: fixed_weight(p - q) (residual), or
// fixed_weight(p) when q is null; `excluded` (-1: none) has weight 0 (residual against a one-hot q).
template <typename P>
struct SampleRowView {
  const P* p;
  const P* q;
  int64_t excluded;

  __device__ __forceinline__ uint64_t weight(int64_t t, float pt) const {
    if (t == excluded) return 0;
    return q ? accept::residual_weight(pt, to_float(q[t])) : accept::fixed_weight(pt);
  }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) speculative_sample_kernel(ChainAcceptParams prm) {
  using namespace accept;
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_reject;
  __shared__ int s_status;
  __shared__ int s_retry;
  __shared__ int s_pick_warp;
  __shared__ int s_token;
  __shared__ uint64_t s_pick_target;
  __shared__ uint64_t s_warp_total[kWarps];
  __shared__ int s_warp_bad[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x, n = prm.n, V = prm.V;
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);

  if (tid == 0) {
    s_reject = INT_MAX;
    s_status = k < 0 ? kBadNumDraft : kOk;
  }
  __syncthreads();
  for (int64_t i = tid; i < k; i += kThreads) {
    bool passed = false;
    const int32_t st = test_draft(prm, b, i, tp, dp, [](P v) { return to_float(v); }, &passed);
    if (st) atomicOr(&s_status, st);
    if (!st && !passed) atomicMin(&s_reject, static_cast<int>(i));
  }
  __syncthreads();

  const int64_t j = s_reject < k ? s_reject : k;  // the position whose token is sampled
  if (s_status == kOk) {
    const bool rejected = j < k;
    SampleRowView<P> row{tp + j * prm.tp_sn, rejected && dp ? dp + j * prm.dp_sn : nullptr,
                         rejected && !dp ? load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j) : -1};
    int64_t begin, end;
    warp_segment<kWarps>(V, warp, &begin, &end);
    for (;;) {  // at most twice: a residual with no mass falls back to p
      uint64_t sum = 0;
      bool bad = false;
      for (int64_t t = begin + lane; t < end; t += 32) {
        const float pt = to_float(row.p[t]);
        bad |= !prob_ok(pt);
        if (row.q) bad |= !prob_ok(to_float(row.q[t]));
        sum += row.weight(t, pt);
      }
      sum = warp_sum(sum);
      bad = __any_sync(kFullMask, bad);
      if (lane == 0) {
        s_warp_total[warp] = sum;
        s_warp_bad[warp] = bad;
      }
      __syncthreads();
      if (tid == 0) {
        uint64_t total = 0;
        int any_bad = 0;
        for (int w = 0; w < kWarps; ++w) {
          total += s_warp_total[w];
          any_bad |= s_warp_bad[w];
        }
        s_retry = 0;
        if (any_bad) {
          s_status = kBadValue;
        } else if (total == 0 && rejected && (row.q || row.excluded >= 0)) {
          s_retry = 1;
        } else if (total == 0) {
          s_status = kZeroMass;
        } else {
          uint64_t target = sample_target(draw(prm.seed, b, j).sample_bits, total);
          int w = 0;
          while (target >= s_warp_total[w]) target -= s_warp_total[w++];
          s_pick_warp = w;
          s_pick_target = target;
        }
      }
      __syncthreads();
      if (!s_retry) break;
      row = SampleRowView<P>{row.p, nullptr, -1};
      __syncthreads();  // every thread has read s_retry before thread 0 may write it again
    }
    if (s_status == kOk && warp == s_pick_warp) {
      const int64_t t = warp_find_token(begin, end, s_pick_target, lane,
                                        [&](int64_t t) { return row.weight(t, to_float(row.p[t])); });
      if (lane == 0) s_token = static_cast<int>(t);
    }
    __syncthreads();
  }

  const int status = s_status;
  int32_t* out = prm.tokens + b * (n + 1);
  for (int64_t i = tid; i <= n; i += kThreads) {
    int32_t v = -1;
    if (status == kOk && i < j) v = static_cast<int32_t>(load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i));
    if (status == kOk && i == j) v = s_token;
    out[i] = v;
  }
  if (tid == 0) prm.num_accepted[b] = status == kOk ? static_cast<int32_t>(j) : -status;
}

}  // namespace fastar::cuda
