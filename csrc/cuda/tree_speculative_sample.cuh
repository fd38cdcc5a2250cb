// CUDA kernels of fastar.tree_speculative_sample. A row's walk (core/tree_acceptance.h's tree_sample_step) reads
// p(x) and q(x) scalars between its passes over V (a view's fixed-point mass, after writing the row's weights when
// a node rejects a second child); the passes are spread over the GPU:
//  1. tree_sample_step_kernel, one block per batch row: the first launch checks the nodes in parallel (OR-ing into
//     the row's status) and starts the walk; each launch advances it, every thread running the same walk, to its
//     next pass, saved in the workspace (TreeWalk), or to its end. The last launch runs the passes still left
//     itself, block-wide (BlockTreeOps).
//  2. tree_sample_pass_kernel, one block per (batch row, chunk of V), between two steps: the pending pass over
//     the chunk (16-byte loads of the p, q rows), its fixed-point total into the workspace.
// A step after a pass adds the chunks' totals and finds a token in the chunk holding the target. Integer sums
// are associative, so the tokens are the CPU kernel's exactly.
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

// The start of a tree kernel's row (blockIdx.x), one block per row: path and tokens -1 padded, the nodes checked
// in parallel (tree_node_status<P>); returns the row's status, the same in every thread.
template <typename P, int kThreads>
__device__ int32_t tree_row_start(const TreeSampleParams& prm, const BlockTreeOutputs& out, bool probabilities,
                                  int* s_status) {
  const int64_t W = prm.max_depth + 1;
  if (threadIdx.x == 0) *s_status = accept::kOk;
  for (int64_t i = threadIdx.x; i < W; i += kThreads) out.path[i] = out.tokens[i] = -1;
  __syncthreads();
  auto load = [](const P* row, int64_t t) { return to_float(row[t]); };
  for (int64_t t = threadIdx.x; t < prm.N; t += kThreads) {
    const int32_t st = tree_node_status<P>(prm, blockIdx.x, t, probabilities, load);
    if (st) atomicOr(s_status, st);
  }
  __syncthreads();
  const int32_t status = *s_status;
  if (!status && prm.root_in_path && threadIdx.x == 0) out.path[0] = 0;
  return status;
}

// The end of a tree kernel's row, every thread with the same status: a marked row's outputs -1 again, and
// num_accepted.
template <int kThreads>
__device__ void tree_row_end(const TreeSampleParams& prm, const BlockTreeOutputs& out, int32_t status,
                             int64_t accepted) {
  __syncthreads();
  if (status) {
    for (int64_t i = threadIdx.x; i <= prm.max_depth; i += kThreads) out.path[i] = out.tokens[i] = -1;
  }
  if (threadIdx.x == 0) prm.num_accepted[blockIdx.x] = status ? -status : static_cast<int32_t>(accepted);
}

// The body of the one-launch tree kernels: tree_row_start, then walk(outputs, &accepted) -> status, run by every
// thread, then tree_row_end.
template <typename P, int kThreads, typename Walk>
__device__ void tree_row_block(const TreeSampleParams& prm, bool probabilities, int* s_status, Walk walk) {
  const int64_t W = prm.max_depth + 1;
  const BlockTreeOutputs out{prm, prm.path + blockIdx.x * W, prm.tokens + blockIdx.x * W};
  int32_t status = tree_row_start<P, kThreads>(prm, out, probabilities, s_status);
  int64_t accepted = 0;
  if (!status) status = walk(out, &accepted);
  tree_row_end<kThreads>(prm, out, status, accepted);
}

template <typename P, int kThreads>
struct BlockTreeOps : BlockTreeOutputs {
  static constexpr int kWarps = kThreads / 32;
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

  __device__ void materialize(const TreeView<P>& v, uint64_t* dst) const {
    __syncthreads();  // every thread has read the weights the walk tested before they change
    for (int64_t t = threadIdx.x; t < prm.V; t += kThreads) dst[t] = v.weight(t, load);
    __syncthreads();
  }
};

// The workspace of the split walk: per batch row its saved walk (TreeWalk<P>) and whether a pass is pending, per
// (row, chunk) the pass's total and a bad-value flag, and the rows' weight rows [B, V].
struct TreeSampleWorkspace {
  void* walks;
  int* pending;
  unsigned long long* sums;
  int* bad;
  uint64_t* weights;
  int64_t chunks, chunk_len;
};

// BlockTreeOps whose find, after a pass run by tree_sample_pass_kernel (from_chunks), scans the chunk holding the
// target a tile at a time (block-wide prefix sums).
template <typename P, int kThreads>
struct SplitTreeOps : BlockTreeOps<P, kThreads> {
  using Base = BlockTreeOps<P, kThreads>;
  const TreeSampleWorkspace& ws;
  bool from_chunks;
  long long* s_chunk;
  unsigned long long* s_target;

  __device__ int64_t find(const TreeView<P>& v, uint64_t target) const {
    if (!from_chunks) return Base::find(v, target);
    const int64_t first = blockIdx.x * ws.chunks;
    if (threadIdx.x == 0) {
      int64_t c = 0;
      while (c < ws.chunks - 1 && target >= ws.sums[first + c]) target -= ws.sums[first + c++];
      *s_chunk = c;
      *s_target = target;
    }
    __syncthreads();
    const int64_t begin = *s_chunk * ws.chunk_len,
                  end = begin + ws.chunk_len < this->prm.V ? begin + ws.chunk_len : this->prm.V;
    uint64_t remaining = *s_target;
    for (int64_t base = begin; base < end; base += kThreads) {  // block-uniform trip count
      const int64_t t = base + threadIdx.x;
      const uint64_t mine = t < end ? v.weight(t, Base::load) : 0;
      uint64_t tile = 0;
      const uint64_t before = block_exclusive_scan<Base::kWarps>(mine, this->s_warp_total, &tile);
      if (remaining < tile) {
        if (before <= remaining && remaining < before + mine) *this->s_token = static_cast<int>(t);
        break;
      }
      remaining -= tile;
    }
    __syncthreads();
    return *this->s_token;
  }
};

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    tree_sample_step_kernel(TreeSampleParams prm, TreeSampleWorkspace ws, bool first, bool last) {
  using Ops = SplitTreeOps<P, kThreads>;
  __shared__ int s_status;
  __shared__ int s_token;
  __shared__ long long s_chunk;
  __shared__ unsigned long long s_target;
  __shared__ unsigned long long s_warp_total[Ops::kWarps];
  __shared__ int s_warp_bad[Ops::kWarps];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, W = prm.max_depth + 1;
  TreeWalk<P>* walks = static_cast<TreeWalk<P>*>(ws.walks);
  const BlockTreeOutputs out{prm, prm.path + b * W, prm.tokens + b * W};
  TreeWalk<P> w;
  int32_t status = accept::kOk;
  if (first) {
    status = tree_row_start<P, kThreads>(prm, out, true, &s_status);
    w.scratch = ws.weights + b * prm.V;
  } else {
    if (!ws.pending[b]) return;  // block-uniform: the row's walk has ended
    w = walks[b];
    uint64_t mass = 0;
    bool bad = false;
    for (int64_t c = tid; c < ws.chunks; c += kThreads) {
      mass += ws.sums[b * ws.chunks + c];
      bad |= ws.bad[b * ws.chunks + c] != 0;
    }
    w.ok = !__syncthreads_or(bad);
    w.mass = block_sum<Ops::kWarps>(mass, s_warp_total);
  }
  Ops ops{{out, s_warp_total, s_warp_bad, &s_token}, ws, !first, &s_chunk, &s_target};
  int64_t accepted = 0;
  while (!status) {
    status = tree_sample_step<P>(prm, b, ops, w, &accepted);
    if (status != kTreePassPending) break;
    if (!last) {  // the next tree_sample_pass_kernel runs the pass
      if (tid == 0) {
        walks[b] = w;
        ws.pending[b] = 1;
      }
      return;
    }
    if (w.materialize) ops.materialize(w.base, w.scratch);
    w.mass = ops.mass(w.sum, &w.ok);
    ops.from_chunks = false;
    status = accept::kOk;
  }
  tree_row_end<kThreads>(prm, out, status, accepted);
  if (tid == 0) ws.pending[b] = 0;
}

// The pending pass of batch row blockIdx.x / chunks over its chunk blockIdx.x % chunks (see the top of this file).
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) tree_sample_pass_kernel(TreeSampleParams prm, TreeSampleWorkspace ws) {
  constexpr int kWarps = kThreads / 32, kVec = kVecOf<P>;
  __shared__ unsigned long long s_warp[kWarps];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / ws.chunks, c = blockIdx.x % ws.chunks;
  if (!ws.pending[b]) return;  // block-uniform
  const TreeWalk<P> w = static_cast<const TreeWalk<P>*>(ws.walks)[b];
  const TreeView<P>& v = w.sum;
  const int64_t begin = c * ws.chunk_len, end = begin + ws.chunk_len < prm.V ? begin + ws.chunk_len : prm.V;
  uint64_t sum = 0;
  bool bad = false;
  if (!w.materialize && !v.W) {  // a target row, or its residual: 16-byte loads where the rows are aligned
    const P *p = global_ptr(v.p), *q = v.q;
    const bool aligned = aligned16(p) && (!q || aligned16(q));
    for (int64_t t = begin + tid * kVec; t < end; t += kThreads * kVec) {
      float xp[kVec], xq[kVec];
      const int m = load_span(p, t, end, aligned, xp);
      if (q) load_span(global_ptr(q), t, end, aligned, xq);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (e < m) {
          bad |= !accept::prob_ok(xp[e]) || (q && !accept::prob_ok(xq[e]));
          const uint64_t wt = q ? accept::residual_weight(xp[e], xq[e]) : accept::fixed_weight(xp[e]);
          sum += t + e == v.excluded ? 0 : wt;
        }
      }
    }
  } else {  // weights: written first when the walk asks (in place: each thread reads and writes its own tokens)
    auto load = [](const P* row, int64_t t) { return to_float(row[t]); };
    for (int64_t t = begin + tid; t < end; t += kThreads) {
      if (w.materialize) w.scratch[t] = w.base.weight(t, load);
      bad |= !v.values_ok(t, load);
      sum += v.weight(t, load);
    }
  }
  const int any_bad = __syncthreads_or(bad);
  sum = block_sum<kWarps>(sum, s_warp);
  if (tid == 0) {
    ws.sums[blockIdx.x] = sum;
    ws.bad[blockIdx.x] = any_bad;
  }
}

}  // namespace fastar::cuda
