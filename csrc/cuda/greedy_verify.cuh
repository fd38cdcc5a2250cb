// CUDA kernels of fastar.greedy_verify, in two launches so that the whole GPU reads the logits:
//  1. greedy_verify_partial_kernel: one block per (row, position, chunk of the vocabulary), 16-byte loads, a
//     block-wide argmax of its chunk (first index of the maximum, as torch.argmax) into the workspace;
//  2. greedy_verify_finish_kernel: one block per row merges the chunks' candidates, finds the first position
//     whose argmax differs from the draft (vLLM's rule) and writes tokens and num_accepted.
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

// The block's best of every thread's candidate (best_v, best_i; nan: the thread saw a NaN), the same in every
// thread: its index, -1 when any thread saw a NaN, and its value in *value when not null. s_v, s_i, s_nan:
// kThreads / 32 entries of shared memory each.
template <int kThreads>
__device__ __forceinline__ int block_argmax_merge(float best_v, int best_i, bool nan, float* s_v, int* s_i, int* s_nan,
                                                  float* value = nullptr) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
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
  if (value) *value = best_v;
  return any_nan ? -1 : best_i;
}

// The workspace of the split: per (row, position, chunk), the chunk's maximum and its index (-1: a NaN in it).
struct GreedyPartials {
  float* value;
  int* index;
  int64_t chunks, chunk_len;
};

// Slot `slot` of w: the block's argmax of row[begin, end) with 16-byte loads (thread 0 writes it). Shared memory
// as block_argmax_merge's.
template <typename P, int kThreads>
__device__ __forceinline__ void chunk_argmax(const P* row, int64_t begin, int64_t end, const GreedyPartials& w,
                                             int64_t slot, float* s_v, int* s_i, int* s_nan) {
  constexpr int kVec = kVecOf<P>;
  const bool aligned = aligned16(row);
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  bool nan = false;
  for (int64_t t = begin + threadIdx.x * kVec; t < end; t += kThreads * kVec) {
    float x[kVec];
    const int m = load_span(row, t, end, aligned, x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < m) {
        nan |= x[e] != x[e];
        argmax_merge(best_v, best_i, x[e], static_cast<int>(t + e));
      }
    }
  }
  const int best = block_argmax_merge<kThreads>(best_v, best_i, nan, s_v, s_i, s_nan, &best_v);
  if (threadIdx.x == 0) {
    w.value[slot] = best_v;
    w.index[slot] = best;
  }
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) greedy_verify_partial_kernel(GreedyVerifyParams prm, GreedyPartials w) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_nan[kWarps];
  const int64_t slot = blockIdx.x, c = slot % w.chunks, i = slot / w.chunks % (prm.n + 1),
                b = slot / w.chunks / (prm.n + 1);
  if (i > row_num_draft(prm.num_draft, prm.nd64, b, prm.n)) return;  // a position the row never reads
  const P* row = static_cast<const P*>(prm.target_logits) + b * prm.tl_sb + i * prm.tl_sn;
  const int64_t begin = c * w.chunk_len, end = begin + w.chunk_len < prm.V ? begin + w.chunk_len : prm.V;
  chunk_argmax<P, kThreads>(row, begin, end, w, slot, s_v, s_i, s_nan);
}

// The argmax of position i of row b (n + 1 positions a row) from its chunks' candidates; -1 when the row holds a
// NaN.
__device__ __forceinline__ int64_t merged_argmax(const GreedyPartials& w, int64_t b, int64_t i, int64_t n) {
  const int64_t first = (b * (n + 1) + i) * w.chunks;
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  for (int64_t c = 0; c < w.chunks; ++c) {
    const int idx = w.index[first + c];
    if (idx < 0) return -1;
    argmax_merge(best_v, best_i, w.value[first + c], idx);
  }
  return best_i;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) greedy_verify_finish_kernel(GreedyVerifyParams prm, GreedyPartials w) {
  using namespace accept;
  __shared__ int s_status;
  __shared__ int s_stop;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, n = prm.n, V = prm.V;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };

  if (tid == 0) {
    s_status = k < 0 ? kBadNumDraft : kOk;
    s_stop = INT_MAX;
  }
  __syncthreads();
  for (int64_t i = tid; i < k; i += kThreads) {
    const int64_t x = draft(i);
    if (x < 0 || x >= V) atomicOr(&s_status, kBadTokenId);
  }
  __syncthreads();
  // The first position that ends the row: a NaN row, the bonus position k, or an argmax that differs from the
  // draft. Only positions up to it are read, so a NaN after it does not count (as in the serial kernel).
  if (s_status == kOk) {
    for (int64_t i = tid; i <= k; i += kThreads) {
      const int64_t best = merged_argmax(w, b, i, n);
      if (best < 0 || i == k || best != draft(i)) atomicMin(&s_stop, static_cast<int>(i));
    }
  }
  __syncthreads();
  if (tid == 0 && s_status == kOk && merged_argmax(w, b, s_stop, n) < 0) s_status = kBadValue;
  __syncthreads();

  const int status = s_status;
  const int64_t stop = s_stop;
  int32_t* out = prm.tokens + b * (n + 1);
  for (int64_t i = tid; i <= n; i += kThreads)
    out[i] = status == kOk && i <= stop ? static_cast<int32_t>(merged_argmax(w, b, i, n)) : -1;
  if (tid == 0) prm.num_accepted[b] = status == kOk ? static_cast<int32_t>(stop) : -status;
}

}  // namespace fastar::cuda
