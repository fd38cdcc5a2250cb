// CUDA kernels of fastar.tree_greedy_verify, in launches that spread the logits over the whole GPU (as
// greedy_verify.cuh's):
//  1. tree_greedy_verify_partial_kernel: one block per (row, logit row, chunk of the vocabulary), 16-byte loads,
//     the chunk's argmax into the workspace (greedy_verify.cuh's chunk_argmax). Launched once for every logit
//     row, or once per tree level for only the rows the walk reads (TreeLevel);
//  2. tree_greedy_verify_finish_kernel: one block per row checks the nodes in parallel, then every thread runs
//     core/tree_acceptance.h's tree_greedy_walk, whose argmaxes merge the chunks' candidates block-wide.
#pragma once
#include <stdexcept>
#include <string>

#include "core/tree_acceptance.h"
#include "cuda/greedy_verify.cuh"
#include "cuda/launchers.h"
#include "cuda/tree_speculative_sample.cuh"

namespace fastar::cuda {

// The split of the tree ops' logit rows (B * (N + 1) of V) over blocks of `threads`.
inline RowSplit tree_row_split(const TreeSampleParams& prm, FloatKind kind, int threads) {
  return split_rows(prm.B * (prm.N + 1), prm.V, tile_elements(kind, threads), multiprocessors());
}

// Whether to read the logits level by level (only the rows the walk reads: at most max_depth + 1 of a row's
// N + 1) rather than all at once: when the rows that skips would take longer to stream than max_depth more
// launches, ~3 us each, in which every SM streams ~76 KB (an H100's 3.35 TB/s over its 132 SMs).
inline bool tree_reads_by_level(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t skipped_bytes = prm.B * (prm.N - prm.max_depth) * prm.V * (kind == FloatKind::kFloat32 ? 4 : 2);
  return skipped_bytes > prm.max_depth * multiprocessors() * int64_t{76 << 10};
}

// The blocks of a split tree op's partial launch (every logit row's chunks); a clear error past one launch.
inline int64_t tree_split_slots(const TreeSampleParams& prm, const RowSplit& split, const char* op) {
  const int64_t slots = prm.B * (prm.N + 1) * split.chunks;
  if (slots > 0x7fffffff || prm.B > 0x7fffffff)
    throw std::invalid_argument(std::string(op) + ": too many (row, node) pairs for one launch");
  return slots;
}

// Calls partial(level) once for every row at once (level -1), or once per level 0..max_depth (tree_reads_by_level).
template <typename Partial>
void for_each_tree_level(const TreeSampleParams& prm, FloatKind kind, Partial partial) {
  const int64_t last = tree_reads_by_level(prm, kind) ? prm.max_depth : -1;
  for (int64_t level = last < 0 ? -1 : 0; level <= last; ++level) partial(level);
}

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

// Which logit rows a launch of a split partial kernel reads (tree_greedy_verify's, typical_accept's): every row
// but those after an absent or out-of-range node (level < 0), or only the rows at depth `level` that the walk
// reads (the root's at 0; after node t, at t's depth, when t's parent is the root or its row was read, and t's
// token passes that row's test). ready[b * (N + 1) + i]: whether row i of b was read, written at its level (level
// 0 clears the others).
struct TreeLevel {
  int* ready;
  int64_t level;
};

// Whether this launch reads logit row `row` (b * (N + 1) + i); chunk: the block's chunk of it (chunk 0 records the
// answer). passes(parent_row, x): whether token x passes the test of logit row parent_row (collective).
template <typename Passes>
__device__ __forceinline__ bool tree_level_reads(const TreeSampleParams& prm, const TreeLevel& lv, int64_t row,
                                                 int64_t chunk, Passes passes) {
  const int64_t i = row % (prm.N + 1), b = row / (prm.N + 1);
  const int64_t x = i > 0 ? tree_draft(prm, b, i - 1) : 0;
  if (lv.level < 0) return x >= 0 && x < prm.V;  // no walk reads the row after this node
  bool reads = lv.level == 0 && i == 0;
  if (lv.level > 0 && i > 0 && x >= 0 && x < prm.V && tree_depth(prm, b, i - 1) == lv.level) {
    const int64_t parent_row = row - i + tree_parent(prm, b, i - 1) + 1;
    reads = lv.ready[parent_row] && passes(parent_row, x);
  }
  if (threadIdx.x == 0 && chunk == 0 && (reads || lv.level == 0)) lv.ready[row] = reads;
  return reads;
}

// Logit row `row` (b * (N + 1) + i) of target_probs.
template <typename P>
__device__ __forceinline__ const P* logit_row(const TreeSampleParams& prm, int64_t row) {
  return static_cast<const P*>(prm.target_probs) + row / (prm.N + 1) * prm.tp_sb + row % (prm.N + 1) * prm.tp_sn;
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    tree_greedy_verify_partial_kernel(TreeSampleParams prm, GreedyPartials w, TreeLevel lv) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_nan[kWarps];
  const int64_t slot = blockIdx.x, row = slot / w.chunks, c = slot % w.chunks;
  const auto passes = [&](int64_t parent_row, int64_t x) {
    return merged_row_argmax<kThreads>(w, parent_row, s_v, s_i, s_nan) == x;
  };
  if (!tree_level_reads(prm, lv, row, c, passes)) return;
  const int64_t begin = c * w.chunk_len, end = begin + w.chunk_len < prm.V ? begin + w.chunk_len : prm.V;
  chunk_argmax<P, kThreads>(logit_row<P>(prm, row), begin, end, w, slot, s_v, s_i, s_nan);
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
