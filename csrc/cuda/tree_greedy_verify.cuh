// CUDA kernel of fastar.tree_greedy_verify: one block per batch row. The nodes are checked in parallel, then every
// thread runs core/tree_acceptance.h's tree_greedy_walk, whose argmaxes are block-wide (greedy_verify.cuh).
#pragma once
#include "core/tree_acceptance.h"
#include "cuda/greedy_verify.cuh"
#include "cuda/tree_speculative_sample.cuh"

namespace fastar::cuda {

template <typename P, int kThreads>
struct BlockGreedyOps : BlockTreeOutputs {
  int64_t* notes;  // the row's [2N], in global memory
  float* s_v;
  int* s_i;
  int* s_nan;

  __device__ int64_t argmax(const P* row) const { return block_argmax<P, kThreads>(row, prm.V, s_v, s_i, s_nan); }
  // Every thread writes the same value and reads back its own write: no barrier needed.
  __device__ void note(int64_t i, int64_t value) const { notes[i] = value; }
  __device__ int64_t noted(int64_t i) const { return notes[i]; }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) tree_greedy_verify_kernel(TreeSampleParams prm) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_status;
  __shared__ float s_v[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ int s_nan[kWarps];
  tree_row_block<P, kThreads>(prm, false, &s_status, [&](const BlockTreeOutputs& out, int64_t* accepted) {
    BlockGreedyOps<P, kThreads> ops{out, reinterpret_cast<int64_t*>(prm.residual) + blockIdx.x * 2 * prm.N, s_v, s_i,
                                    s_nan};
    return tree_greedy_walk<P>(prm, blockIdx.x, ops, accepted);
  });
}

}  // namespace fastar::cuda
