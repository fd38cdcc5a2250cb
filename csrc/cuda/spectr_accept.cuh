// CUDA kernels of fastar.spectr_accept (docs/acceptance.md "SpecTr", cost in docs/design/tree-acceptance.md), in two
// launches so that the heavy part, rho* of every level, uses the whole GPU:
//  1. spectr_solve_kernel, one block per (batch row, draft j, level t): where draft j is the first of the k >= 2
//     drafts sharing its first t tokens (the drafts alive when the walk reaches that prefix: it follows from the
//     ids alone), the block solves that level's rho* with the rule of core/spectr.h: kPasses passes over the
//     (p, q) rows, 16-byte loads where the rows are aligned; each token's fixed-point p and q go into a
//     shared-memory histogram of p / q (integer atomics, SplitSum: the sums do not depend on the order). A block
//     scan of the bins gives beta at every bin edge; the first edge that satisfies the condition is an atomicMin.
//     The level (or the rows' bad-value status) goes to the workspace (spectr::Node).
//  2. spectr_accept_kernel, one block per batch row, walks the drafts' prefix tree level by level: thread 0 reads
//     the level, tests the level's drafts in index order (k is small) and narrows the drafts alive. At a
//     rejection (or after the last level) the block samples one token: each warp sums a contiguous segment in
//     fixed point, thread 0 picks the segment holding the target, that warp scans it 32 tokens at a time.
#pragma once
#include <climits>

#include "core/spectr.h"
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
  int root, status, bad, rep, k;
};

// Shared memory of spectr_accept_kernel.
template <int kThreads>
struct SpectrShared {
  static constexpr int kWarps = kThreads / 32;
  unsigned long long warp_total[kWarps];
  int warp_bad[kWarps];
  unsigned long long pick_target, alive;
  spectr::Level level;
  int status, pick, token;
};

// Every (p, q) pair of two rows, 16 bytes at a time when both are aligned (load_span); f(p, q) per token.
template <typename P, int kThreads, typename F>
__device__ __forceinline__ void for_each_pair(const P* p, const P* q, int64_t V, F f) {
  constexpr int kVec = kVecOf<P>;
  const bool aligned = aligned16(p) && aligned16(q);
  for (int64_t t = threadIdx.x * kVec; t < V; t += kThreads * kVec) {
    float xp[kVec], xq[kVec];
    const int m = load_span(p, t, V, aligned, xp);
    load_span(q, t, V, aligned, xq);
#pragma unroll
    for (int e = 0; e < kVec; ++e)  // a constant trip count keeps xp, xq in registers
      if (e < m) f(xp[e], xq[e]);
  }
}

// rho* of one level with k >= 2 drafts (core/spectr.h, the CPU's solve_level in parallel); pass 0 validates the
// rows. Leaves s.level set, or s.status = kBadValue.
template <typename P, int kThreads>
__device__ void solve_level(const P* p, const P* q, int64_t V, int64_t k, SpectrSolveShared<kThreads>& s) {
  using namespace spectr;
  constexpr int kPerThread = kBins / kThreads;
  static_assert(kBins % kThreads == 0, "bins split evenly over the threads");
  const int tid = threadIdx.x, lane = tid & 31;
  Bracket br = first_bracket(k);
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int g = tid; g < kBins; g += kThreads) s.hp[g] = s.hq[g] = SplitSum{0, 0};
    if (tid == 0) {
      s.p_below = s.q_above = SplitSum{0, 0};
      s.bad = 0;
      s.root = kBins;
    }
    __syncthreads();
    bool bad = false;
    for_each_pair<P, kThreads>(p, q, V, [&](float pt, float qt) {
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
    if (s.bad) {  // only pass 0 can see a bad value: the rows do not change
      if (tid == 0) s.status = accept::kBadValue;
      return;
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
    if (root == 0) break;
    br = Bracket{edge(br, root - 1), br.width / kBins};
    __syncthreads();  // every thread has read s.root, s.p_lt and s.q_ge before the next pass resets them
  }
  __syncthreads();
}

// Grid (k * n, min(B, 65535)): block (j * n + t, y) solves node (b, j, t) for the rows b = y, y + gridDim.y, ...
// where draft j is the first of k >= 2 drafts with its first t tokens; other blocks leave their node unwritten
// (the walk never reads it).
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) spectr_solve_kernel(SpectrParams prm) {
  using namespace spectr;
  __shared__ SpectrSolveShared<kThreads> s;
  const int64_t K = prm.K, n = prm.n, V = prm.V, j = blockIdx.x / n, t = blockIdx.x % n;
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
      const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + j * prm.tp_sk + t * prm.tp_sn;
      const P* q = static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + j * prm.dp_sk + t * prm.dp_sn;
      solve_level<P, kThreads>(p, q, V, s.k, s);
      if (threadIdx.x == 0) static_cast<Node*>(prm.nodes)[(b * K + j) * n + t] = Node{s.level, s.status};
    }
    __syncthreads();  // every thread has read s.rep and s.k before the next row's thread 0 writes them
  }
}

// Samples one token of weights weight(t, &bad) over [0, V) with the whole block: returns 1 with s.token set,
// 0 when the weights have no mass, -1 when a value read was invalid (bad set). Every thread gets the result.
template <int kThreads, typename Weight>
__device__ int block_sample(int64_t V, uint64_t bits, Weight weight, SpectrShared<kThreads>& s) {
  constexpr int kWarps = SpectrShared<kThreads>::kWarps;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t begin, end;
  warp_segment<kWarps>(V, warp, &begin, &end);
  uint64_t sum = 0;
  bool bad = false;
  for (int64_t t = begin + lane; t < end; t += 32) sum += weight(t, &bad);
  sum = warp_sum(sum);
  bad = __any_sync(kFullMask, bad);
  if (lane == 0) {
    s.warp_total[warp] = sum;
    s.warp_bad[warp] = bad;
  }
  __syncthreads();
  if (tid == 0) {
    uint64_t total = 0;
    int any_bad = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += s.warp_total[w];
      any_bad |= s.warp_bad[w];
    }
    s.pick = any_bad ? -2 : total == 0 ? -1 : 0;
    if (s.pick == 0) {
      uint64_t target = accept::sample_target(bits, total);
      int w = 0;
      while (target >= s.warp_total[w]) target -= s.warp_total[w++];
      s.pick = w;
      s.pick_target = target;
    }
  }
  __syncthreads();
  const int pick = s.pick;
  if (pick == warp) {
    bool unused = false;
    const int64_t t = warp_find_token(begin, end, s.pick_target, lane, [&](int64_t t) { return weight(t, &unused); });
    if (lane == 0) s.token = static_cast<int>(t);
  }
  __syncthreads();
  return pick >= 0 ? 1 : pick == -1 ? 0 : -1;
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) spectr_accept_kernel(SpectrParams prm) {
  using namespace accept;
  using namespace spectr;
  __shared__ SpectrShared<kThreads> s;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, K = prm.K, n = prm.n, V = prm.V;
  auto id = [&](int64_t j, int64_t t) {
    return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j * prm.ids_sk + t);
  };
  int32_t* out = prm.tokens + b * (n + 1);

  if (tid == 0) {
    s.status = kOk;
    s.alive = K == 64 ? ~0ull : (1ull << K) - 1;
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
    const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + rep * prm.tp_sk + t * prm.tp_sn;
    const uint64_t bits = draw(prm.seed, b, draw_position(t, K, 0)).sample_bits;
    if (t == n) {  // every level accepted: the bonus token from p
      const int r = block_sample<kThreads>(
          V, bits,
          [&](int64_t x, bool* bad) {
            const float px = to_float(p[x]);
            *bad |= !prob_ok(px);
            return fixed_weight(px);
          },
          s);
      if (tid == 0 && r <= 0) s.status = r == 0 ? kZeroMass : kBadValue;
      if (tid == 0 && r > 0) out[t] = s.token;
      __syncthreads();
      break;
    }
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
        out[t] = static_cast<int32_t>(y);
        uint64_t next = alive;
        for (uint64_t m = alive; m; m &= m - 1) {
          const int64_t j = __ffsll(static_cast<long long>(m)) - 1;
          if (id(j, t) != y) next &= ~(1ull << j);
        }
        s.alive = next;
      }
    }
    __syncthreads();
    if (s.status != kOk) break;
    if (s.token >= 0) {
      ++t;
      __syncthreads();  // every thread has read s.token before the next level writes it
      continue;
    }
    // No candidate accepted: the residual, or p where it has no mass (p == q up to fixed-point precision).
    const Level lv = s.level;
    int r = block_sample<kThreads>(
        V, bits,
        [&](int64_t x, bool* bad) {
          const float px = to_float(p[x]), qx = to_float(q[x]);
          *bad |= !prob_ok(px) || !prob_ok(qx);
          return spectr::residual_weight(px, qx, lv);
        },
        s);
    if (r == 0) {
      r = block_sample<kThreads>(V, bits, [&](int64_t x, bool*) { return fixed_weight(to_float(p[x])); }, s);
    }
    if (tid == 0 && r <= 0) s.status = r == 0 ? kZeroMass : kBadValue;
    if (tid == 0 && r > 0) out[t] = s.token;
    __syncthreads();
    break;
  }

  const int status = s.status;
  for (int64_t i = tid; i <= n; i += kThreads)
    if (status != kOk || i > t) out[i] = -1;
  if (tid == 0) {
    prm.num_accepted[b] = status == kOk ? static_cast<int32_t>(t) : -status;
    prm.draft_index[b] = status == kOk ? static_cast<int32_t>(rep) : -1;
  }
}

}  // namespace fastar::cuda
