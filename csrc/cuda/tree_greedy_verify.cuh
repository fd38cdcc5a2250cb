// CUDA kernels of fastar.tree_greedy_verify, in launches that spread the logits over the whole GPU (as
// greedy_verify.cuh's):
//  1. tree_greedy_verify_partial_kernel: one block per (row, logit row, chunk of the vocabulary), 16-byte loads,
//     the chunk's argmax into the workspace (greedy_verify.cuh's chunk_argmax). Launched once for every logit
//     row, or once per tree level for only the rows the walk reads (TreeLevel);
//  2. tree_greedy_verify_finish_kernel: one block per row checks the nodes in parallel, then every thread runs
//     core/tree_acceptance.h's tree_greedy_walk, whose argmaxes merge the chunks' candidates block-wide.
#pragma once
#include "core/tree_acceptance.h"
#include "cuda/greedy_verify.cuh"
#include "cuda/tree_speculative_sample.cuh"

namespace fastar::cuda {

// Logit row `row` (b * (N + 1) + i)'s argmax from its chunks' candidates, the same in every thread (collective);
// -1 when the row holds a NaN. Shared memory as block_argmax_merge's.
template <int kThreads>
__device__ __forceinline__ int64_t merged_row_argmax(const GreedyPartials& w, int64_t row, float* s_v, int* s_i,
                                                     int* s_nan) {
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  bool nan = false;
  for (int64_t c = threadIdx.x; c < w.chunks; c += kThreads) {
    const int idx = w.index[row * w.chunks + c];
    nan |= idx < 0;
    argmax_merge(best_v, best_i, w.value[row * w.chunks + c], idx);
  }
  return block_argmax_merge<kThreads>(best_v, best_i, nan, s_v, s_i, s_nan);
}

// Which logit rows a launch of the partial kernel reads: every row but those after an absent or out-of-range
// node (level < 0), or only the rows at depth `level` that the walk reads (the root's at 0; after node t, at t's
// depth, when t's parent is the root or its row was read, and t's token is that row's argmax). ready[b * (N + 1)
// + i]: whether row i of b was read, written at its level (level 0 clears the others).
struct TreeLevel {
  int* ready;
  int64_t level;
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    tree_greedy_verify_partial_kernel(TreeSampleParams prm, GreedyPartials w, TreeLevel lv) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_nan[kWarps];
  const int64_t slot = blockIdx.x, row = slot / w.chunks, c = slot % w.chunks, i = row % (prm.N + 1),
                b = row / (prm.N + 1);
  const int64_t x = i > 0 ? tree_draft(prm, b, i - 1) : 0;
  if (lv.level < 0) {
    if (x < 0 || x >= prm.V) return;  // no walk reads the row after this node
  } else {
    bool reads = lv.level == 0 && i == 0;
    if (lv.level > 0 && i > 0 && x >= 0 && x < prm.V && tree_depth(prm, b, i - 1) == lv.level) {
      const int64_t parent_row = row - i + tree_parent(prm, b, i - 1) + 1;
      reads = lv.ready[parent_row] && merged_row_argmax<kThreads>(w, parent_row, s_v, s_i, s_nan) == x;
    }
    if (threadIdx.x == 0 && c == 0 && (reads || lv.level == 0)) lv.ready[row] = reads;
    if (!reads) return;
  }
  const P* logits = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + i * prm.tp_sn;
  const int64_t begin = c * w.chunk_len, end = begin + w.chunk_len < prm.V ? begin + w.chunk_len : prm.V;
  chunk_argmax<P, kThreads>(logits, begin, end, w, slot, s_v, s_i, s_nan);
}

template <int kThreads>
struct BlockGreedyOps : BlockTreeOutputs {
  const GreedyPartials& w;
  int64_t* notes;  // the row's [2N], in global memory
  float* s_v;
  int* s_i;
  int* s_nan;

  __device__ int64_t argmax(int64_t i) const {
    return merged_row_argmax<kThreads>(w, static_cast<int64_t>(blockIdx.x) * (prm.N + 1) + i, s_v, s_i, s_nan);
  }
  // Every thread writes the same value and reads back its own write: no barrier needed.
  __device__ void note(int64_t i, int64_t value) const { notes[i] = value; }
  __device__ int64_t noted(int64_t i) const { return notes[i]; }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) tree_greedy_verify_finish_kernel(TreeSampleParams prm, GreedyPartials w) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_status;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_nan[kWarps];
  tree_row_block<P, kThreads>(prm, false, &s_status, [&](const BlockTreeOutputs& out, int64_t* accepted) {
    int64_t* notes = reinterpret_cast<int64_t*>(prm.residual) + blockIdx.x * 2 * prm.N;
    BlockGreedyOps<kThreads> ops{out, w, notes, s_v, s_i, s_nan};
    return tree_greedy_walk(prm, blockIdx.x, ops, accepted);
  });
}

}  // namespace fastar::cuda
