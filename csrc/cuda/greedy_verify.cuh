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

// The block's argmax of row[0, V) (first index of the maximum; 0 for a row of -inf), the same in every thread;
// -1 when the row holds a NaN. s_v, s_i, s_nan: kThreads / 32 entries of shared memory each.
template <typename P, int kThreads>
__device__ int64_t block_argmax(const P* row, int64_t V, float* s_v, int* s_i, int* s_nan) {
  constexpr int kWarps = kThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
    s_v[warp] = best_v;
    s_i[warp] = best_i;
    s_nan[warp] = nan;
  }
  __syncthreads();
  int any_nan = 0;
  for (int w = 0; w < kWarps; ++w) {
    argmax_merge(best_v, best_i, s_v[w], s_i[w]);
    any_nan |= s_nan[w];
  }
  __syncthreads();  // read by all before the next call writes them
  return any_nan ? -1 : best_i;
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) greedy_verify_kernel(GreedyVerifyParams prm) {
  using namespace accept;
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_status;
  __shared__ float s_warp_v[kWarps];
  __shared__ int s_warp_i[kWarps];
  __shared__ int s_warp_nan[kWarps];

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, n = prm.n, V = prm.V;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };
  int32_t* out = prm.tokens + b * (n + 1);

  if (tid == 0) s_status = k < 0 ? kBadNumDraft : kOk;
  __syncthreads();
  for (int64_t i = tid; i < k; i += kThreads) {
    const int64_t x = draft(i);
    if (x < 0 || x >= V) atomicOr(&s_status, kBadTokenId);
  }
  __syncthreads();

  // Every thread takes the same argmaxes, so the loop's trip count is the block's.
  int status = s_status;
  int64_t stop = -1;  // the position of the last emitted token, once known
  for (int64_t i = 0; status == kOk && stop < 0 && i <= k; ++i) {
    const P* row = static_cast<const P*>(prm.target_logits) + b * prm.tl_sb + i * prm.tl_sn;
    const int64_t best = block_argmax<P, kThreads>(row, V, s_warp_v, s_warp_i, s_warp_nan);
    if (best < 0) {
      status = kBadValue;
      break;
    }
    if (i == k || best != draft(i)) stop = i;
    if (tid == 0) out[i] = static_cast<int32_t>(best);
  }

  // Slots up to stop were written above; the rest are padding (everything, for a bad row).
  for (int64_t i = (status == kOk ? stop + 1 : 0) + tid; i <= n; i += kThreads) out[i] = -1;
  if (tid == 0) prm.num_accepted[b] = status == kOk ? static_cast<int32_t>(stop) : -status;
}

}  // namespace fastar::cuda
