// CUDA kernels of the chain ops (fastar.speculative_sample, lantern_accept, gsd_accept, sjd_accept), in two
// launches so that the whole GPU reads the row to sample from:
//  1. speculative_sample_partial_kernel, one block per (batch row, chunk of the vocabulary): the block tests the
//     drafts (validation + the rule of core/lantern.h: a thread per draft, or in gsd_partial_kernel a warp per
//     draft, warp_test_gsd; the first rejection is an atomicMin in shared memory), then sums its chunk of the row to
//     sample from in fixed point with 16-byte loads: the residual's weights and p's (the fallback when the
//     residual has no mass), into the workspace.
//  2. speculative_sample_finish_kernel, one block per batch row: the two-level inverse CDF (cuda/chunked_sample.cuh).
//     The chunk sums give the total and the chunk holding the target; the block scans that chunk a tile at a time
//     (block-wide prefix sums) for the token. Integer sums are associative, so the token is the CPU kernel's.
//     SJD's refreshed positions are then sampled by the same block, a whole-row pass each.
#pragma once
#include <climits>

#include "cuda/chunked_sample.cuh"
#include "cuda/common.cuh"

namespace fastar::cuda {

// Weights of the row to sample from, as in the CPU kernel: fixed_weight(p - q) (residual), or fixed_weight(p)
// when q is null; `excluded` (-1: none) has weight 0 (residual against a one-hot q).
template <typename P>
struct SampleRowView {
  const P* p;
  const P* q;
  int64_t excluded;

  __device__ __forceinline__ uint64_t weight(int64_t t, float pt, float qt) const {
    if (t == excluded) return 0;
    return q ? accept::residual_weight(pt, qt) : accept::fixed_weight(pt);
  }
  __device__ __forceinline__ SampleRowView plain() const { return {p, nullptr, -1}; }
};

// The workspace: per (batch row, chunk) the residual's and p's fixed-point sums and a bad-value flag; per batch
// row the draft test's status and the position j whose token is sampled.
struct SampleWorkspace {
  ChunkSums sums;
  int* status;
  int* position;
};

// Merges the lanes' ranking windows (each over the lane's tokens) into the window over the whole row, in every
// lane: per side, cap rounds of a butterfly that picks the nearest head among the lanes.
__device__ __forceinline__ void warp_merge_window(RankWindow& w) {
  RankWindow m(w.px, w.x, w.cap[0], w.cap[1]);
  for (int s = 0; s < 2; ++s) {
    int32_t head = 0;
    for (int32_t r = 0; r < w.cap[s]; ++r) {
      const bool has = head < w.count[s];
      float bp = has ? w.p[s][head] : 0.0f;
      int32_t bt = has ? w.t[s][head] : -1;
      for (int d = 16; d > 0; d >>= 1) {
        const float op = __shfl_xor_sync(kFullMask, bp, d);
        const int32_t ot = __shfl_xor_sync(kFullMask, bt, d);
        if (ot >= 0 && (bt < 0 || RankWindow::nearer(s, op, ot, bp, bt))) {
          bp = op;
          bt = ot;
        }
      }
      if (bt < 0) break;  // warp-uniform: no lane has a token left on this side
      if (has && w.t[s][head] == bt) ++head;
      m.p[s][r] = bp;
      m.t[s][r] = bt;
      m.count[s] = r + 1;
    }
  }
  w = m;
}

// GSD's test of draft i by one warp; every lane returns the same status and outcome. The lanes offer strided
// 16-byte spans of the target row to their own windows (every value validated), merge them, and apply
// gsd_group_test as the CPU does.
template <typename P>
__device__ int32_t warp_test_gsd(const ChainAcceptParams& prm, int64_t b, int64_t i, const P* tp, const P* dp, int lane,
                                 bool* accepted) {
  using namespace accept;
  constexpr int kVec = kVecOf<P>;
  auto load = [](P v) { return to_float(v); };
  int64_t x;
  float px, qx;
  double u;
  const int32_t head = draft_head(prm, b, i, tp, dp, load, &x, &px, &qx, &u);
  if (head) return head;
  const P* p = tp + i * prm.tp_sn;
  const bool aligned = aligned16(p);
  RankWindow w(px, x, prm.gsd_above, prm.gsd_below);
  bool bad = false;
  for (int64_t t = static_cast<int64_t>(lane) * kVec; t < prm.V; t += 32 * kVec) {
    float xp[kVec];
    const int m = load_span(p, t, prm.V, aligned, xp);
    for (int e = 0; e < m; ++e) {
      bad |= !prob_ok(xp[e]);
      if (w.may_take(xp[e])) w.offer(xp[e], t + e);
    }
  }
  if (__any_sync(kFullMask, bad)) return kBadValue;
  warp_merge_window(w);
  return gsd_group_test(prm, w, dp ? dp + i * prm.dp_sn : nullptr, load, u, qx, accepted);
}

// The draft tests of row b, by the whole block: returns the row's status; *j gets the sampled position. kGsd: GSD's
// warp per draft (prm.embeddings set), whose ranking windows live in local memory; else a thread per draft.
template <typename P, int kThreads, bool kGsd>
__device__ int32_t test_row(const ChainAcceptParams& prm, int64_t b, const P* tp, const P* dp, int* s_reject,
                            int* s_status, int64_t* j) {
  using namespace accept;
  const int tid = threadIdx.x;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, prm.n);
  if (tid == 0) {
    *s_reject = INT_MAX;
    *s_status = k < 0 ? kBadNumDraft : kOk;
  }
  __syncthreads();
  if constexpr (kGsd) {
    const int lane = tid & 31;
    for (int64_t i = tid >> 5; i < k; i += kThreads / 32) {
      bool passed = false;
      const int32_t st = warp_test_gsd(prm, b, i, tp, dp, lane, &passed);
      if (lane == 0 && st) atomicOr(s_status, st);
      if (lane == 0 && !st && !passed) atomicMin(s_reject, static_cast<int>(i));
    }
  } else {
    for (int64_t i = tid; i < k; i += kThreads) {
      bool passed = false;
      const int32_t st = test_draft<false>(prm, b, i, tp, dp, [](P v) { return to_float(v); }, &passed);
      if (st) atomicOr(s_status, st);
      if (!st && !passed) atomicMin(s_reject, static_cast<int>(i));
    }
  }
  __syncthreads();
  *j = *s_reject < k ? *s_reject : k;
  const int32_t status = *s_status;
  __syncthreads();  // read by all before the caller may reuse them
  return status;
}

// The row to sample from at position j of row b: the residual when a draft was rejected, else the bonus row p.
template <typename P>
__device__ __forceinline__ SampleRowView<P> sample_row(const ChainAcceptParams& prm, int64_t b, int64_t j) {
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, prm.n);
  const bool rejected = j < k;
  return SampleRowView<P>{tp + j * prm.tp_sn, rejected && dp ? dp + j * prm.dp_sn : nullptr,
                          rejected && !dp ? load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j) : -1};
}

// Launch 1 of the chain ops: the draft tests, then the chunk's sums (see the top of this file).
template <typename P, int kThreads, bool kGsd>
__device__ __forceinline__ void sample_partial(const ChainAcceptParams& prm, const SampleWorkspace& w) {
  using namespace accept;
  constexpr int kWarps = kThreads / 32;
  __shared__ int s_reject;
  __shared__ int s_status;
  __shared__ unsigned long long s_warp[kWarps];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / w.sums.chunks, c = blockIdx.x % w.sums.chunks;
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  int64_t j = 0;
  const int32_t status = test_row<P, kThreads, kGsd>(prm, b, tp, dp, &s_reject, &s_status, &j);
  if (c == 0 && tid == 0) {
    w.status[b] = status;
    w.position[b] = static_cast<int>(j);
  }
  if (status != kOk) return;

  chunk_sums<P, kThreads>(sample_row<P>(prm, b, j), prm.V, b, c, w.sums, s_warp);
}

// speculative_sample, lantern_accept and sjd_accept: no local memory.
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads)
    speculative_sample_partial_kernel(ChainAcceptParams prm, SampleWorkspace w) {
  sample_partial<P, kThreads, false>(prm, w);
}

// gsd_accept: the same launch with GSD's warp-per-draft test.
template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) gsd_partial_kernel(ChainAcceptParams prm, SampleWorkspace w) {
  sample_partial<P, kThreads, true>(prm, w);
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) speculative_sample_finish_kernel(ChainAcceptParams prm, SampleWorkspace w) {
  using namespace accept;
  constexpr int kWarps = kThreads / 32, kVec = kVecOf<P>;
  __shared__ int s_status;
  __shared__ int s_token;
  __shared__ int s_fresh;
  __shared__ ChunkPick s_pick;
  __shared__ unsigned long long s_warp[kWarps];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, n = prm.n;
  const int64_t j = w.position[b];
  const int32_t tested = w.status[b];

  // A residual with no mass falls back to p (only a rejected draft has a residual).
  const SampleRowView<P> row = tested == kOk ? sample_row<P>(prm, b, j) : SampleRowView<P>{nullptr, nullptr, -1};
  const int32_t drawn = block_draw<P, kThreads>(w.sums, b, prm.V, tested, row, row.q || row.excluded >= 0,
                                                draw(prm.seed, b, j).sample_bits, &s_pick, s_warp, &s_token);
  if (tid == 0) s_status = drawn;
  __syncthreads();

  // SJD: after a rejection, positions j+1..k get fresh drafts from their own rows, a whole-row pass each.
  const int64_t refresh = s_status == kOk ? sjd_refresh_count(prm, j, row_num_draft(prm.num_draft, prm.nd64, b, n)) : 0;
  for (int64_t pos = j + 1; pos <= j + refresh; ++pos) {
    const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
    const SampleRowView<P> row{tp + pos * prm.tp_sn, nullptr, -1};
    const bool aligned = aligned16(row.p);
    uint64_t plain = 0;
    bool bad = false;
    for (int64_t t = tid * kVec; t < prm.V; t += kThreads * kVec) {
      float xp[kVec];
      const int m = load_span(row.p, t, prm.V, aligned, xp);
      for (int e = 0; e < m; ++e) {
        bad |= !prob_ok(xp[e]);
        plain += fixed_weight(xp[e]);
      }
    }
    const int any_bad = __syncthreads_or(bad);
    const uint64_t total = block_sum<kWarps>(plain, s_warp);
    if (any_bad || total == 0) {
      if (tid == 0) s_status = any_bad ? kBadValue : kZeroMass;
      __syncthreads();
      break;
    }
    block_pick_token<P, kThreads>(row, 0, prm.V, sample_target(draw(prm.seed, b, pos).sample_bits, total), s_warp,
                                  &s_fresh);
    __syncthreads();
    if (tid == 0) {
      prm.next_drafts[b * n + pos - j - 1] = s_fresh;
      prm.next_probs[b * n + pos - j - 1] = to_float(row.p[s_fresh]);
    }
  }
  __syncthreads();

  const int status = s_status;
  int32_t* out = prm.tokens + b * (n + 1);
  for (int64_t i = tid; i <= n; i += kThreads) {
    int32_t v = -1;
    if (status == kOk && i < j) v = static_cast<int32_t>(load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i));
    if (status == kOk && i == j) v = s_token;
    out[i] = v;
  }
  for (int64_t i = tid; prm.next_drafts && i < n; i += kThreads) {  // SJD's padding, or a marked row's
    if (status != kOk || i >= refresh) {
      prm.next_drafts[b * n + i] = -1;
      prm.next_probs[b * n + i] = 0.0f;
    }
  }
  if (tid == 0) prm.num_accepted[b] = status == kOk ? static_cast<int32_t>(j) : -status;
}

}  // namespace fastar::cuda
