// CUDA kernel of fastar.typical_accept: one block per batch row. The nodes are checked in parallel, then every
// thread runs core/tree_acceptance.h's typical_walk, whose softmax statistics are block-wide: the argmax
// (greedy_verify.cuh), then the sums of exp((x - m) / T) and of its product with (x - m) / T.
#pragma once
#include "core/tree_acceptance.h"
#include "cuda/greedy_verify.cuh"
#include "cuda/tree_speculative_sample.cuh"

namespace fastar::cuda {

template <typename P, int kThreads>
struct BlockTypicalOps : BlockTreeOutputs {
  static constexpr int kWarps = kThreads / 32;
  TypicalNode* nodes;  // the row's [N], in global memory
  float* s_v;
  int* s_i;
  int* s_nan;
  float* s_sum;  // [2 * kWarps]

  __device__ static float load(const P* row, int64_t t) { return to_float(row[t]); }

  __device__ RowStats stats(const P* row) const {
    RowStats s{0.0f, block_argmax<P, kThreads>(row, prm.V, s_v, s_i, s_nan), 0.0f, 0.0f};
    if (s.argmax < 0 || prm.temperature == 0.0f) return s;
    s.max = load(row, s.argmax);
    const float inv_t = prm.inv_temperature;
    float sum = 0.0f, weighted = 0.0f;
    for (int64_t t = threadIdx.x; t < prm.V; t += kThreads) {
      const float z = fmaxf((load(row, t) - s.max) * inv_t, kTypicalFloor), e = expf(z);
      sum += e;
      weighted += e * z;
    }
    for (int d = 16; d > 0; d >>= 1) {
      sum += __shfl_xor_sync(kFullMask, sum, d);
      weighted += __shfl_xor_sync(kFullMask, weighted, d);
    }
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      s_sum[warp] = sum;
      s_sum[kWarps + warp] = weighted;
    }
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) {
      s.sum += s_sum[w];
      s.weighted += s_sum[kWarps + w];
    }
    __syncthreads();  // read by all before the next call writes them
    return s;
  }
  // Every thread writes the same node and reads back its own write: no barrier needed.
  __device__ void keep(int64_t t, const TypicalNode& node) const { nodes[t] = node; }
  __device__ TypicalNode kept(int64_t t) const { return nodes[t]; }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) typical_accept_kernel(TreeSampleParams prm) {
  using Ops = BlockTypicalOps<P, kThreads>;
  __shared__ int s_status;
  __shared__ float s_v[Ops::kWarps];
  __shared__ int s_i[Ops::kWarps];
  __shared__ int s_nan[Ops::kWarps];
  __shared__ float s_sum[2 * Ops::kWarps];
  tree_row_block<P, kThreads>(prm, false, &s_status, [&](const BlockTreeOutputs& out, int64_t* accepted) {
    Ops ops{out, reinterpret_cast<TypicalNode*>(prm.residual) + blockIdx.x * prm.N, s_v, s_i, s_nan, s_sum};
    return typical_walk<P>(prm, blockIdx.x, ops, accepted);
  });
}

}  // namespace fastar::cuda
