// CUDA kernel of fastar.greedy_verify: one block per batch row; the block takes the argmax of one target
// row after another until a draft differs from it (vLLM's rule, torch.argmax's first-index tie rule).
#pragma once
#include <climits>

#include "cuda/common.cuh"

namespace fastar::cuda {

// The better of two (value, index) candidates: larger value, then smaller index.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) greedy_verify_kernel(GreedyVerifyParams prm) {
  using namespace accept;
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_status;
  __shared__ int s_stop;  // position of the last emitted token, once known
  __shared__ int s_best;
  __shared__ float s_warp_v[kWarps];
  __shared__ int s_warp_i[kWarps];
  __shared__ int s_warp_nan[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x, n = prm.n, V = prm.V;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };
  int32_t* out = prm.tokens + b * (n + 1);

  if (tid == 0) {
    s_status = k < 0 ? kBadNumDraft : kOk;
    s_stop = -1;
  }
  __syncthreads();
  for (int64_t i = tid; i < k; i += kThreads) {
    const int64_t x = draft(i);
    if (x < 0 || x >= V) atomicOr(&s_status, kBadTokenId);
  }
  __syncthreads();

  for (int64_t i = 0; s_status == kOk && s_stop < 0 && i <= k; ++i) {
    const P* row = static_cast<const P*>(prm.target_logits) + b * prm.tl_sb + i * prm.tl_sn;
    float best_v = -INFINITY;
    int best_i = INT_MAX;
    bool nan = false;
    for (int64_t t = tid; t < V; t += kThreads) {
      const float v = to_float(row[t]);
      nan |= v != v;
      argmax_merge(best_v, best_i, v, static_cast<int>(t));
    }
    for (int d = 16; d > 0; d >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, best_v, d);
      const int oi = __shfl_xor_sync(kFullMask, best_i, d);
      argmax_merge(best_v, best_i, ov, oi);
    }
    nan = __any_sync(kFullMask, nan);
    if (lane == 0) {
      s_warp_v[warp] = best_v;
      s_warp_i[warp] = best_i;
      s_warp_nan[warp] = nan;
    }
    __syncthreads();
    if (tid == 0) {
      int any_nan = 0;
      for (int w = 0; w < kWarps; ++w) {
        argmax_merge(best_v, best_i, s_warp_v[w], s_warp_i[w]);
        any_nan |= s_warp_nan[w];
      }
      if (any_nan) {
        s_status = kBadValue;
      } else {
        s_best = best_i;
        if (i == k || best_i != draft(i)) s_stop = static_cast<int>(i);
      }
    }
    __syncthreads();
    if (tid == 0 && s_status == kOk) out[i] = s_best;
  }

  const int status = s_status;
  // Slots up to s_stop were written above; the rest are padding (everything, for a bad row).
  for (int64_t i = (status == kOk ? s_stop + 1 : 0) + tid; i <= n; i += kThreads) out[i] = -1;
  if (tid == 0) prm.num_accepted[b] = status == kOk ? s_stop : -status;
}

}  // namespace fastar::cuda
