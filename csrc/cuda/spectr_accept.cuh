// CUDA kernels of fastar.spectr_accept (docs/acceptance.md "SpecTr", cost in docs/design/tree-acceptance.md), in two
// launches so that the heavy part, rho* of every level, uses the whole GPU:
//  1. spectr_solve_kernel, blocks per (batch row, draft j, level t): where draft j is the first of the k >= 2
//     drafts sharing its first t tokens (the drafts alive when the walk reaches that prefix: it follows from the
//     ids alone), the blocks solve that level's rho* with the rule of core/spectr.h: kPasses passes over the
//     (p, q) rows, 16-byte loads where the rows are aligned; each token's fixed-point p and q go into a
//     shared-memory histogram of p / q (integer atomics, SplitSum: the sums do not depend on the order). A block
//     scan of the bins gives beta at every bin edge; the first edge that satisfies the condition is an atomicMin.
//     The level (or the rows' bad-value status) goes to the workspace (spectr::Node). With few nodes for the
//     GPU, a node's rows split over chunks of V, one block each and a launch per pass: the chunks' histograms
//     are added in global memory and the last block of a node solves the pass (SpectrSolveState).
//  2. spectr_walk_kernel, one block per batch row, walks the drafts' prefix tree level by level: thread 0 reads
//     the level, tests the level's drafts in index order (k is small) and narrows the drafts alive. It ends at a
//     rejection (the level's residual to sample from) or after the last level (the bonus row p), recorded in the
//     workspace (SpectrRow).
//  3. spectr_draw_partial_kernel, one block per (batch row, chunk of V), and spectr_draw_finish_kernel, one block
//     per batch row: the two-level inverse CDF of cuda/chunked_sample.cuh over that row (p where the residual has
//     no mass), then the row's outputs.
#pragma once
#include <climits>

#include "core/spectr.h"
#include "cuda/chunked_sample.cuh"
#include "cuda/common.cuh"

namespace fastar::cuda {

// Shared memory of spectr_solve_kernel.
template <int kThreads>
struct SpectrSolveShared {
  static constexpr int kWarps = kThreads / 32;
  SplitSum hp[spectr::kBins], hq[spectr::kBins];
  SplitSum p_below, q_above;
  unsigned long long p_lt, q_ge;
  unsigned long long warp_p[kWarps], warp_q[kWarps];
  spectr::Level level;
  int root, status, bad, rep, k, last;
};

// A node's pass merged over the blocks of its chunks, in the workspace (zeroed by the glue): the chunks' histograms
// added with global atomics, the bracket of the next pass, and the blocks done with this pass. The last block to
// finish reads the sums, solves the pass and zeroes them for the next.
struct SpectrSolveState {
  unsigned long long hp[spectr::kBins], hq[spectr::kBins], p_below, q_above;
  spectr::Bracket br;
  int bad, done, blocks;
};

// The split of the solve's nodes over V: `chunks` blocks of chunk_len elements per node; states: [B, k, n] when
// chunks > 1 (each pass is then its own launch), else null.
struct SpectrSolveSplit {
  SpectrSolveState* states;
  int64_t chunks, chunk_len;
};

// Shared memory of spectr_walk_kernel.
struct SpectrShared {
  unsigned long long alive;
  spectr::Level level;
  int status, token;
};

// Where a row's walk ended: status (kOk, or the row's mark), level t (n: every draft level accepted), the draft
// rep whose rows it reads, and the level's rule (for the residual at t < n).
struct SpectrRow {
  spectr::Level level;
  int32_t status, t, rep;
};

// The workspace of the walk and the draw: a SpectrRow per batch row, the chunk sums per (row, chunk).
struct SpectrDraws {
  SpectrRow* rows;
  ChunkSums sums;
};

// The row a walk's end samples from (chunked_sample.cuh's Row): level t's residual p - min(q, p / rho) c, or the
// bonus row p (q null).
template <typename P>
struct SpectrRowView {
  const P* p;
  const P* q;
  spectr::Level level;

  __device__ __forceinline__ uint64_t weight(int64_t, float pt, float qt) const {
    return q ? spectr::residual_weight(pt, qt, level) : accept::fixed_weight(pt);
  }
  __device__ __forceinline__ SpectrRowView plain() const { return {p, nullptr, level}; }
};

template <typename P>
__device__ __forceinline__ SpectrRowView<P> spectr_row(const SpectrParams& prm, int64_t b, const SpectrRow& r) {
  const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + r.rep * prm.tp_sk + r.t * prm.tp_sn;
  const P* q = r.t < prm.n
                   ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + r.rep * prm.dp_sk + r.t * prm.dp_sn
                   : nullptr;
  return SpectrRowView<P>{p, q, r.level};
}

// Every (p, q) pair of two rows in [begin, end) (begin a multiple of kVecOf<P>), 16 bytes at a time when both are
// aligned (load_span); f(p, q) per token.
template <typename P, int kThreads, typename F>
__device__ __forceinline__ void for_each_pair(const P* p, const P* q, int64_t begin, int64_t end, F f) {
  constexpr int kVec = kVecOf<P>;
  const bool aligned = aligned16(p) && aligned16(q);
  for (int64_t t = begin + threadIdx.x * kVec; t < end; t += kThreads * kVec) {
    float xp[kVec], xq[kVec];
    const int m = load_span(p, t, end, aligned, xp);
    load_span(q, t, end, aligned, xq);
#pragma unroll
    for (int e = 0; e < kVec; ++e)  // a constant trip count keeps xp, xq in registers
      if (e < m) f(xp[e], xq[e]);
  }
}

// Adds this block's histogram into the node's state; returns, in every thread, whether this block was the last of
// the node's chunks, which then holds the merged sums in s (and the state is zeroed for the next pass).
template <int kThreads>
__device__ bool merge_chunks(SpectrSolveState* state, int64_t chunks, SpectrSolveShared<kThreads>& s) {
  using namespace spectr;
  const int tid = threadIdx.x;
  for (int g = tid; g < kBins; g += kThreads) {
    if (const uint64_t v = s.hp[g].value()) atomicAdd(&state->hp[g], static_cast<unsigned long long>(v));
    if (const uint64_t v = s.hq[g].value()) atomicAdd(&state->hq[g], static_cast<unsigned long long>(v));
  }
  if (tid == 0) {
    atomicAdd(&state->p_below, static_cast<unsigned long long>(s.p_below.value()));
    atomicAdd(&state->q_above, static_cast<unsigned long long>(s.q_above.value()));
    if (s.bad) atomicOr(&state->bad, 1);
  }
  __threadfence();  // this block's sums are visible before its count
  __syncthreads();
  if (tid == 0) s.last = atomicAdd(&state->blocks, 1) == chunks - 1;
  __syncthreads();
  if (!s.last) return false;
  __threadfence();  // the other blocks' sums, counted before this block's, are read after it
  auto take = [](unsigned long long* sum) {
    const uint64_t v = atomicExch(sum, 0ull);
    return SplitSum{static_cast<unsigned>(v), static_cast<unsigned>(v >> 32)};
  };
  for (int g = tid; g < kBins; g += kThreads) {
    s.hp[g] = take(&state->hp[g]);
    s.hq[g] = take(&state->hq[g]);
  }
  if (tid == 0) {
    s.p_below = take(&state->p_below);
    s.q_above = take(&state->q_above);
    s.bad = state->bad;
    state->blocks = 0;
  }
  __syncthreads();
  return true;
}

// rho* of one level with k >= 2 drafts (core/spectr.h, the CPU's solve_level in parallel), passes [pass_begin,
// pass_end) over chunk c of the rows; pass 0 validates them. With a state (a split node), each pass's sums are
// merged across the chunks' blocks and only the last block goes on. Returns, in every thread, whether this block
// finished the node: s.level set, or s.status = kBadValue.
template <typename P, int kThreads>
__device__ bool solve_level(const P* p, const P* q, int64_t V, int64_t k, int64_t c, const SpectrSolveSplit& split,
                            SpectrSolveState* state, int pass_begin, int pass_end, SpectrSolveShared<kThreads>& s) {
  using namespace spectr;
  constexpr int kPerThread = kBins / kThreads;
  static_assert(kBins % kThreads == 0, "bins split evenly over the threads");
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t begin = c * split.chunk_len, end = begin + split.chunk_len < V ? begin + split.chunk_len : V;
  if (pass_begin > 0 && state->done) return false;  // solved (or marked) by an earlier pass: its Node is written
  Bracket br = pass_begin == 0 ? first_bracket(k) : state->br;
  for (int pass = pass_begin; pass < pass_end; ++pass) {
    for (int g = tid; g < kBins; g += kThreads) s.hp[g] = s.hq[g] = SplitSum{0, 0};
    if (tid == 0) {
      s.p_below = s.q_above = SplitSum{0, 0};
      s.bad = 0;
      s.root = kBins;
    }
    __syncthreads();
    bool bad = false;
    for_each_pair<P, kThreads>(p, q, begin, end, [&](float pt, float qt) {
      bad |= !accept::prob_ok(pt) || !accept::prob_ok(qt);
      const int g = ratio_bin(pt, qt, br);
      if (g == kBelow) {
        s.p_below.add(accept::fixed_weight(pt));
      } else if (g == kAbove) {
        s.q_above.add(accept::fixed_weight(qt));
      } else if (g != kNone) {
        s.hp[g].add(accept::fixed_weight(pt));
        s.hq[g].add(accept::fixed_weight(qt));
      }
    });
    if (__any_sync(kFullMask, bad) && lane == 0) atomicOr(&s.bad, 1);
    __syncthreads();
    if (state && !merge_chunks<kThreads>(state, split.chunks, s)) return false;
    if (s.bad) {  // only pass 0 can see a bad value: the rows do not change
      if (tid == 0) s.status = accept::kBadValue;
      if (tid == 0 && state) state->done = 1;
      return true;
    }
    // Exclusive prefix sums of the bins over the block: thread tid owns bins [tid * kPerThread, + kPerThread).
    uint64_t own_p = 0, own_q = 0;
    for (int e = 0; e < kPerThread; ++e) {
      own_p += s.hp[tid * kPerThread + e].value();
      own_q += s.hq[tid * kPerThread + e].value();
    }
    constexpr int kWarps = SpectrSolveShared<kThreads>::kWarps;
    uint64_t p_bins, q_bins;
    uint64_t p_lt = s.p_below.value() + block_exclusive_scan<kWarps>(own_p, s.warp_p, &p_bins);
    uint64_t q_lt = block_exclusive_scan<kWarps>(own_q, s.warp_q, &q_bins);
    const uint64_t p_lt0 = p_lt, q_lt0 = q_lt;
    for (int e = 0; e < kPerThread; ++e) {  // the first edge at or above rho* among this thread's
      const int g = tid * kPerThread + e;
      const double rho = edge(br, g);
      if (edge_ok(rho, beta_at(rho, p_lt, s.q_above.value() + q_bins - q_lt), k)) {
        atomicMin(&s.root, g);
        break;
      }
      p_lt += s.hp[g].value();
      q_lt += s.hq[g].value();
    }
    __syncthreads();
    const int root = s.root;
    if (root == kBins && tid == kThreads - 1) {
      s.p_lt = p_lt;
      s.q_ge = s.q_above.value() + q_bins - q_lt;
    } else if (root < kBins && root / kPerThread == tid) {
      uint64_t pl = p_lt0, ql = q_lt0;
      for (int g = tid * kPerThread; g < root; ++g) {
        pl += s.hp[g].value();
        ql += s.hq[g].value();
      }
      s.p_lt = pl;
      s.q_ge = s.q_above.value() + q_bins - ql;
    }
    __syncthreads();
    const double rho = edge(br, root);
    if ((root == 0 || pass == kPasses - 1) && tid == 0) s.level = make_level(rho, beta_at(rho, s.p_lt, s.q_ge), k);
    if (root == 0 || pass == kPasses - 1) {
      if (tid == 0 && state) state->done = 1;
      __syncthreads();
      return true;
    }
    br = Bracket{edge(br, root - 1), br.width / kBins};
    if (tid == 0 && state) state->br = br;
    __syncthreads();  // every thread has read s.root, s.p_lt and s.q_ge before the next pass resets them
  }
  return false;  // a split node's pass, not its last: the next launch goes on
}

// Grid (k * n * split.chunks, min(B, 65535)): block ((j * n + t) * chunks + c, y) runs passes [pass_begin, pass_end)
// over chunk c of node (b, j, t) for the rows b = y, y + gridDim.y, ... where draft j is the first of k >= 2 drafts
// with its first t tokens; the block that finishes the node writes it (spectr::Node). Other nodes stay unwritten
// (the walk never reads them).
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    spectr_solve_kernel(SpectrParams prm, SpectrSolveSplit split, int pass_begin, int pass_end) {
  using namespace spectr;
  __shared__ SpectrSolveShared<kThreads> s;
  const int64_t K = prm.K, n = prm.n, V = prm.V, node = blockIdx.x / split.chunks, c = blockIdx.x % split.chunks;
  const int64_t j = node / n, t = node % n;
  for (int64_t b = blockIdx.y; b < prm.B; b += gridDim.y) {
    if (threadIdx.x == 0) {
      s.rep = static_cast<int>(K);
      s.k = 0;
      s.status = accept::kOk;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {  // the drafts sharing draft j's first t tokens
      bool same = true;
      for (int64_t u = 0; u < t && same; ++u)
        same = load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i * prm.ids_sk + u) ==
               load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j * prm.ids_sk + u);
      if (same) {
        atomicMin(&s.rep, static_cast<int>(i));
        atomicAdd(&s.k, 1);
      }
    }
    __syncthreads();
    if (s.rep == j && s.k >= 2) {
      const int64_t at = (b * K + j) * n + t;
      const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + j * prm.tp_sk + t * prm.tp_sn;
      const P* q = static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + j * prm.dp_sk + t * prm.dp_sn;
      SpectrSolveState* state = split.states ? split.states + at : nullptr;
      if (solve_level<P, kThreads>(p, q, V, s.k, c, split, state, pass_begin, pass_end, s) && threadIdx.x == 0)
        static_cast<Node*>(prm.nodes)[at] = Node{s.level, s.status};
    }
    __syncthreads();  // every thread has read s.rep and s.k before the next row's thread 0 writes them
  }
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) spectr_walk_kernel(SpectrParams prm, SpectrDraws w) {
  using namespace accept;
  using namespace spectr;
  __shared__ SpectrShared s;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, K = prm.K, n = prm.n, V = prm.V;
  auto id = [&](int64_t j, int64_t t) {
    return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j * prm.ids_sk + t);
  };

  if (tid == 0) {
    s.status = kOk;
    s.alive = K == 64 ? ~0ull : (1ull << K) - 1;
    s.level = make_level(1.0, 0.0, 1);
  }
  __syncthreads();
  for (int64_t i = tid; i < K * n; i += kThreads) {
    const int64_t x = id(i / n, i % n);
    if (x < 0 || x >= V) atomicOr(&s.status, static_cast<int>(kBadTokenId));
  }
  __syncthreads();

  int64_t t = 0, rep = 0;
  while (s.status == kOk) {
    const uint64_t alive = s.alive;
    rep = __ffsll(static_cast<long long>(alive)) - 1;
    if (t == n) break;  // every level accepted: the bonus token from p
    const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + rep * prm.tp_sk + t * prm.tp_sn;
    const P* q = static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + rep * prm.dp_sk + t * prm.dp_sn;
    if (tid == 0) {  // the level spectr_solve_kernel solved, where k >= 2 drafts are alive
      if (__popcll(alive) > 1) {
        const Node node = static_cast<const Node*>(prm.nodes)[(b * K + rep) * n + t];
        s.level = node.level;
        if (node.status != kOk) s.status = node.status;
      } else {
        s.level = make_level(1.0, 0.0, 1);
      }
    }
    __syncthreads();
    if (s.status != kOk) break;
    if (tid == 0) {  // the candidates in index order
      int64_t y = -1;
      for (uint64_t m = alive; m && y < 0; m &= m - 1) {
        const int64_t j = __ffsll(static_cast<long long>(m)) - 1, x = id(j, t);
        const float px = to_float(p[x]), qx = to_float(q[x]);
        if (!prob_ok(px) || !prob_ok(qx)) {
          s.status = kBadValue;
          break;
        }
        if (accept_candidate(draw(prm.seed, b, draw_position(t, K, j)).accept_u, s.level, px, qx)) y = x;
      }
      s.token = static_cast<int>(y);
      if (y >= 0) {
        prm.tokens[b * (n + 1) + t] = static_cast<int32_t>(y);
        uint64_t next = alive;
        for (uint64_t m = alive; m; m &= m - 1) {
          const int64_t j = __ffsll(static_cast<long long>(m)) - 1;
          if (id(j, t) != y) next &= ~(1ull << j);
        }
        s.alive = next;
      }
    }
    __syncthreads();
    if (s.status != kOk || s.token < 0) break;  // a rejection: level t's residual
    ++t;
    __syncthreads();  // every thread has read s.token before the next level writes it
  }
  if (tid == 0) w.rows[b] = SpectrRow{s.level, s.status, static_cast<int32_t>(t), static_cast<int32_t>(rep)};
}

// Chunk blockIdx.x % chunks of the row batch row blockIdx.x / chunks samples from.
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) spectr_draw_partial_kernel(SpectrParams prm, SpectrDraws w) {
  __shared__ unsigned long long s_warp[kThreads / 32];
  const int64_t b = blockIdx.x / w.sums.chunks, c = blockIdx.x % w.sums.chunks;
  const SpectrRow r = w.rows[b];
  if (r.status != accept::kOk) return;  // block-uniform
  chunk_sums<P, kThreads>(spectr_row<P>(prm, b, r), prm.V, b, c, w.sums, s_warp);
}

// Batch row blockIdx.x's token at its walk's end, then its outputs: tokens -1 past it (all of a marked row's),
// num_accepted (-status for a marked row) and draft_index.
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) spectr_draw_finish_kernel(SpectrParams prm, SpectrDraws w) {
  using namespace accept;
  __shared__ int s_token;
  __shared__ ChunkPick s_pick;
  __shared__ unsigned long long s_warp[kThreads / 32];
  const int64_t b = blockIdx.x, n = prm.n;
  const SpectrRow r = w.rows[b];
  // A residual with no mass (p == q up to fixed-point precision) falls back to p.
  const SpectrRowView<P> row = r.status == kOk ? spectr_row<P>(prm, b, r) : SpectrRowView<P>{};
  const int32_t status = block_draw<P, kThreads>(w.sums, b, prm.V, r.status, row, r.t < n,
                                                 draw(prm.seed, b, spectr::draw_position(r.t, prm.K, 0)).sample_bits,
                                                 &s_pick, s_warp, &s_token);
  const int tid = threadIdx.x;
  int32_t* out = prm.tokens + b * (n + 1);
  for (int64_t i = tid; i <= n; i += kThreads) {
    if (status != kOk || i > r.t) out[i] = -1;
    if (status == kOk && i == r.t) out[i] = s_token;
  }
  if (tid == 0) {
    prm.num_accepted[b] = status == kOk ? r.t : -status;
    prm.draft_index[b] = status == kOk ? r.rep : -1;
  }
}

}  // namespace fastar::cuda
