// CUDA kernel of fastar.tree_speculative_sample: one block per batch row.
//  1. Threads check the nodes in parallel (core/tree_acceptance.h's tree_node_status), OR-ing into the row's
//     status in shared memory.
//  2. Every thread runs the same walk down the tree (tree_sample_walk); its passes over V are block-wide: each
//     warp sums a contiguous segment of the row in fixed point (the integer sums make the tokens identical to
//     the CPU kernel's), weights are written to the row's global scratch, and the token is found in the
//     segment holding the target (common.cuh's warp_find_token).
#pragma once
#include "core/tree_acceptance.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

// Where the tree kernels' walks write a row's outputs (core/tree_acceptance.h's emit): thread 0 writes.
struct BlockTreeOutputs {
  const TreeSampleParams& prm;
  int32_t* path;
  int32_t* tokens;

  __device__ void emit(int64_t i, int64_t node, int64_t token) const {
    if (threadIdx.x != 0) return;
    tokens[i] = static_cast<int32_t>(token);
    if (node >= 0) path[i + prm.root_in_path] = static_cast<int32_t>(node + prm.root_in_path);
  }
};

// The body of the tree kernels, one block per row: path and tokens -1 padded, the nodes checked in parallel
// (tree_node_status<P>), then walk(outputs, &accepted) -> status, run by every thread; num_accepted written.
template <typename P, int kThreads, typename Walk>
__device__ void tree_row_block(const TreeSampleParams& prm, bool probabilities, int* s_status, Walk walk) {
  const int64_t b = blockIdx.x, W = prm.max_depth + 1;
  const BlockTreeOutputs out{prm, prm.path + b * W, prm.tokens + b * W};
  if (threadIdx.x == 0) *s_status = accept::kOk;
  for (int64_t i = threadIdx.x; i < W; i += kThreads) out.path[i] = out.tokens[i] = -1;
  __syncthreads();
  auto load = [](const P* row, int64_t t) { return to_float(row[t]); };
  for (int64_t t = threadIdx.x; t < prm.N; t += kThreads) {
    const int32_t st = tree_node_status<P>(prm, b, t, probabilities, load);
    if (st) atomicOr(s_status, st);
  }
  __syncthreads();
  int32_t status = *s_status;
  int64_t accepted = 0;
  if (!status) {
    if (prm.root_in_path && threadIdx.x == 0) out.path[0] = 0;
    status = walk(out, &accepted);
  }
  __syncthreads();
  if (status) {
    for (int64_t i = threadIdx.x; i < W; i += kThreads) out.path[i] = out.tokens[i] = -1;
  }
  if (threadIdx.x == 0) prm.num_accepted[b] = status ? -status : static_cast<int32_t>(accepted);
}

template <typename P, int kThreads>
struct BlockTreeOps : BlockTreeOutputs {
  static constexpr int kWarps = kThreads / 32;
  uint64_t* w;                       // the row's weights [V], in global memory
  unsigned long long* s_warp_total;  // [kWarps]: each warp's segment mass in the last mass()
  int* s_warp_bad;                   // [kWarps]
  int* s_token;

  __device__ static float load(const P* row, int64_t t) { return to_float(row[t]); }

  __device__ uint64_t mass(const TreeView<P>& v, bool* ok) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t begin, end;
    warp_segment<kWarps>(prm.V, warp, &begin, &end);
    uint64_t sum = 0;
    bool bad = false;
    for (int64_t t = begin + lane; t < end; t += 32) {
      bad |= !v.values_ok(t, load);
      sum += v.weight(t, load);
    }
    sum = warp_sum(sum);
    bad = __any_sync(kFullMask, bad);
    if (lane == 0) {
      s_warp_total[warp] = sum;
      s_warp_bad[warp] = bad;
    }
    __syncthreads();
    uint64_t total = 0;
    bool any_bad = false;
    for (int i = 0; i < kWarps; ++i) {
      total += s_warp_total[i];
      any_bad |= s_warp_bad[i] != 0;
    }
    __syncthreads();  // read by all before the next mass() writes them
    *ok = !any_bad;
    return total;
  }

  // After mass(v): the warp whose segment holds the target scans it.
  __device__ int64_t find(const TreeView<P>& v, uint64_t target) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int pick = 0;
    while (pick < kWarps - 1 && target >= s_warp_total[pick]) target -= s_warp_total[pick++];
    if (warp == pick) {
      int64_t begin, end;
      warp_segment<kWarps>(prm.V, warp, &begin, &end);
      const int64_t t = warp_find_token(begin, end, target, lane, [&](int64_t i) { return v.weight(i, load); });
      if (lane == 0) *s_token = static_cast<int>(t);
    }
    __syncthreads();
    return *s_token;
  }

  __device__ const uint64_t* materialize(const TreeView<P>& v) const {
    __syncthreads();  // every thread has read the weights the walk tested before they change
    for (int64_t t = threadIdx.x; t < prm.V; t += kThreads) w[t] = v.weight(t, load);
    __syncthreads();
    return w;
  }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) tree_speculative_sample_kernel(TreeSampleParams prm) {
  using Ops = BlockTreeOps<P, kThreads>;
  __shared__ int s_status;
  __shared__ int s_token;
  __shared__ unsigned long long s_warp_total[Ops::kWarps];
  __shared__ int s_warp_bad[Ops::kWarps];
  tree_row_block<P, kThreads>(prm, true, &s_status, [&](const BlockTreeOutputs& out, int64_t* accepted) {
    Ops ops{out, prm.residual + blockIdx.x * prm.V, s_warp_total, s_warp_bad, &s_token};
    return tree_sample_walk<P>(prm, blockIdx.x, ops, accepted);
  });
}

}  // namespace fastar::cuda
