// CUDA kernels of fastar.typical_accept, split as tree_greedy_verify's so that the whole GPU reads the logits:
//  1. typical_accept_partial_kernel: one block per (row, logit row, chunk of the vocabulary), 16-byte loads: the
//     chunk's max and its first index and, at T > 0, its sums of exp(z) and exp(z) z, z = (x - max) / T, in one
//     pass (a new maximum rescales what was summed). Every logit row at once, or level by level (TreeLevel);
//  2. typical_accept_finish_kernel: one block per row checks the nodes, then every thread runs
//     core/tree_acceptance.h's typical_walk over the rows' statistics merged from their chunks.
#pragma once
#include <climits>

#include "core/tree_acceptance.h"
#include "cuda/tree_greedy_verify.cuh"

namespace fastar::cuda {

// The workspace of the split: per (row, logit row, chunk), chunk_argmax's max and index (-1: a NaN in it) and, at
// T > 0, the chunk's sums relative to that max.
struct TypicalPartials {
  GreedyPartials arg;
  float* sum;
  float* weighted;
};

// Softmax statistics of some elements: their max and its first index, whether one was NaN, and the sums of exp(z)
// and exp(z) z, z = max((x - max) / T, kTypicalFloor) (RowStats' terms).
struct TypicalState {
  float max;
  int index;
  bool nan;
  float sum, weighted;
};

// Moves (sum, weighted) to a larger max: delta = (old max - new max) / T <= 0 is added to every term's z.
__device__ __forceinline__ void typical_rescale(float& sum, float& weighted, float delta) {
  if (sum == 0.0f) return;  // nothing summed yet (or only terms that are 0)
  delta = fmaxf(delta, kTypicalFloor);
  const float r = expf(delta);
  weighted = r * (weighted + delta * sum);
  sum *= r;
}

__device__ __forceinline__ void typical_add(TypicalState& s, float x, int index, float inv_t) {
  if (x != x) {
    s.nan = true;
    return;
  }
  if (x > s.max) typical_rescale(s.sum, s.weighted, (s.max - x) * inv_t);
  argmax_merge(s.max, s.index, x, index);
  const float z = fmaxf((x - s.max) * inv_t, kTypicalFloor), e = expf(z);
  s.sum += e;
  s.weighted += e * z;
}

__device__ __forceinline__ void typical_merge(TypicalState& s, TypicalState o, float inv_t) {
  const float m = fmaxf(s.max, o.max);
  typical_rescale(s.sum, s.weighted, (s.max - m) * inv_t);
  typical_rescale(o.sum, o.weighted, (o.max - m) * inv_t);
  argmax_merge(s.max, s.index, o.max, o.index);
  s.nan |= o.nan;
  s.sum += o.sum;
  s.weighted += o.weighted;
}

// The block's merge of every thread's state, the same in every thread. s_f: 3 * kThreads / 32 floats, s_i:
// 2 * kThreads / 32 ints of shared memory.
template <int kThreads>
__device__ __forceinline__ TypicalState block_typical_merge(TypicalState s, float inv_t, float* s_f, int* s_i) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 16; d > 0; d >>= 1) {
    const TypicalState o{__shfl_xor_sync(kFullMask, s.max, d), __shfl_xor_sync(kFullMask, s.index, d), false,
                         __shfl_xor_sync(kFullMask, s.sum, d), __shfl_xor_sync(kFullMask, s.weighted, d)};
    typical_merge(s, o, inv_t);
  }
  s.nan = __any_sync(kFullMask, s.nan);
  if (lane == 0) {
    s_f[warp] = s.max;
    s_f[kWarps + warp] = s.sum;
    s_f[2 * kWarps + warp] = s.weighted;
    s_i[warp] = s.index;
    s_i[kWarps + warp] = s.nan;
  }
  __syncthreads();
  TypicalState all{-INFINITY, INT_MAX, false, 0.0f, 0.0f};
#pragma unroll 1
  for (int w = 0; w < kWarps; ++w)
    typical_merge(all, TypicalState{s_f[w], s_i[w], s_i[kWarps + w] != 0, s_f[kWarps + w], s_f[2 * kWarps + w]}, inv_t);
  __syncthreads();  // read by all before the next call writes them
  return all;
}

// Logit row `row`'s statistics from its chunks' (collective): the argmax only at T == 0 (RowStats.argmax -1: a NaN
// in the row).
template <int kThreads>
__device__ __forceinline__ RowStats merged_row_stats(const TreeSampleParams& prm, const TypicalPartials& w, int64_t row,
                                                     float* s_f, int* s_i) {
  constexpr int kWarps = kThreads / 32;
  if (prm.temperature == 0.0f)
    return RowStats{0.0f, merged_row_argmax<kThreads>(w.arg, row, s_f, s_i, s_i + kWarps), 0.0f, 0.0f};
  TypicalState s{-INFINITY, INT_MAX, false, 0.0f, 0.0f};
  for (int64_t c = threadIdx.x; c < w.arg.chunks; c += kThreads) {
    const int64_t slot = row * w.arg.chunks + c;
    const int idx = w.arg.index[slot];
    typical_merge(s, TypicalState{w.arg.value[slot], idx < 0 ? INT_MAX : idx, idx < 0, w.sum[slot], w.weighted[slot]},
                  prm.inv_temperature);
  }
  s = block_typical_merge<kThreads>(s, prm.inv_temperature, s_f, s_i);
  return RowStats{s.max, s.nan ? -1 : s.index, s.sum, s.weighted};
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    typical_accept_partial_kernel(TreeSampleParams prm, TypicalPartials w, TreeLevel lv) {
  constexpr int kWarps = kThreads / 32, kVec = kVecOf<P>;
  __shared__ float s_f[3 * kWarps];
  __shared__ int s_i[2 * kWarps];
  const int64_t slot = blockIdx.x, row = slot / w.arg.chunks, c = slot % w.arg.chunks;
  const auto passes = [&](int64_t parent_row, int64_t x) {
    const TypicalNode up = typical_node(prm, merged_row_stats<kThreads>(prm, w, parent_row, s_f, s_i), 0);
    return up.argmax >= 0 && typical_pass(prm, up, x, to_float(logit_row<P>(prm, parent_row)[x]));
  };
  if (!tree_level_reads(prm, lv, row, c, passes)) return;
  const P* logits = logit_row<P>(prm, row);
  const int64_t begin = c * w.arg.chunk_len, end = begin + w.arg.chunk_len < prm.V ? begin + w.arg.chunk_len : prm.V;
  if (prm.temperature == 0.0f)
    return chunk_argmax<P, kThreads>(logits, begin, end, w.arg, slot, s_f, s_i, s_i + kWarps);
  const bool aligned = aligned16(logits);
  TypicalState s{-INFINITY, INT_MAX, false, 0.0f, 0.0f};
  for (int64_t t = begin + threadIdx.x * kVec; t < end; t += kThreads * kVec) {
    float x[kVec];
    const int m = load_span(logits, t, end, aligned, x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < m) typical_add(s, x[e], static_cast<int>(t + e), prm.inv_temperature);
    }
  }
  s = block_typical_merge<kThreads>(s, prm.inv_temperature, s_f, s_i);
  if (threadIdx.x == 0) {
    w.arg.value[slot] = s.max;
    w.arg.index[slot] = s.nan ? -1 : s.index;
    w.sum[slot] = s.sum;
    w.weighted[slot] = s.weighted;
  }
}

template <typename P, int kThreads>
struct BlockTypicalOps : BlockTreeOutputs {
  TypicalPartials w;
  const P* logits;     // the row's [N + 1, V] (row stride tp_sn)
  TypicalNode* nodes;  // the row's [N], in global memory
  float* s_f;
  int* s_i;

  __device__ RowStats stats(int64_t i) const {
    return merged_row_stats<kThreads>(prm, w, static_cast<int64_t>(blockIdx.x) * (prm.N + 1) + i, s_f, s_i);
  }
  __device__ float logit(int64_t i, int64_t x) const { return to_float(logits[i * prm.tp_sn + x]); }
  // Every thread writes the same node and reads back its own write: no barrier needed.
  __device__ void keep(int64_t t, const TypicalNode& node) const { nodes[t] = node; }
  __device__ TypicalNode kept(int64_t t) const { return nodes[t]; }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) typical_accept_finish_kernel(TreeSampleParams prm, TypicalPartials w) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_status;
  __shared__ float s_f[3 * kWarps];
  __shared__ int s_i[2 * kWarps];
  tree_row_block<P, kThreads>(prm, false, &s_status, [&](const BlockTreeOutputs& out, int64_t* accepted) {
    BlockTypicalOps<P, kThreads> ops{out,
                                     w,
                                     static_cast<const P*>(prm.target_probs) + blockIdx.x * prm.tp_sb,
                                     reinterpret_cast<TypicalNode*>(prm.residual) + blockIdx.x * prm.N,
                                     s_f,
                                     s_i};
    return typical_walk(prm, blockIdx.x, ops, accepted);
  });
}

}  // namespace fastar::cuda
