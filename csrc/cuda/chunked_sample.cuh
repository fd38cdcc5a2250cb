// The two-level exact inverse CDF of the sampling kernels that split a row over blocks (speculative_sample's
// chain ops, spectr_accept): one block per (row, chunk of V) sums its chunk's fixed-point weights into the
// workspace (chunk_sums); one block per row then adds the chunks' sums, picks the chunk holding the target
// (pick_chunk) and scans that chunk a tile at a time (block_pick_token): block_draw. Integer sums are
// associative, so the token is the CPU kernel's exactly.
//
// A row view (Row) has `const P* p`, `const P* q` (null: no second row; both in global memory), `uint64_t
// weight(int64_t t, float p_t, float q_t)`, the fixed-point weight of token t, and `Row plain()`, the view of p's own
// weights.
#pragma once
#include <stdexcept>
#include <string>

#include "core/acceptance.h"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace fastar::cuda {

// Per (row, chunk): the view's weights' sum, p's own (fixed_weight) sum and a bad-value flag; slot b * chunks + c.
struct ChunkSums {
  unsigned long long* weighted;
  unsigned long long* plain;
  int* bad;
  int64_t chunks, chunk_len;
};

// Block-wide: chunk c of row b's sums into w (16-byte loads where the rows are aligned); a p value, or a q value
// where row.q is set, that is not a probability sets the chunk's bad flag.
template <typename P, int kThreads, typename Row>
__device__ void chunk_sums(const Row& row, int64_t V, int64_t b, int64_t c, const ChunkSums& w,
                           unsigned long long* s_warp) {
  constexpr int kWarps = kThreads / 32, kVec = kVecOf<P>;
  const int64_t begin = c * w.chunk_len, end = begin + w.chunk_len < V ? begin + w.chunk_len : V;
  const bool aligned = aligned16(row.p) && (!row.q || aligned16(row.q));
  uint64_t weighted = 0, plain = 0;
  bool bad = false;
  for (int64_t t = begin + threadIdx.x * kVec; t < end; t += kThreads * kVec) {
    float xp[kVec], xq[kVec];
    const int m = load_span(global_ptr(row.p), t, end, aligned, xp);
    if (row.q) load_span(global_ptr(row.q), t, end, aligned, xq);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (e < m) {
        const float qt = row.q ? xq[e] : 0.0f;
        bad |= !accept::prob_ok(xp[e]) || (row.q && !accept::prob_ok(qt));
        weighted += row.weight(t + e, xp[e], qt);
        plain += accept::fixed_weight(xp[e]);
      }
    }
  }
  const int any_bad = __syncthreads_or(bad);
  weighted = block_sum<kWarps>(weighted, s_warp);
  plain = block_sum<kWarps>(plain, s_warp);
  if (threadIdx.x == 0) {
    const int64_t slot = b * w.chunks + c;
    w.weighted[slot] = weighted;
    w.plain[slot] = plain;
    w.bad[slot] = any_bad;
  }
}

// Where chunk_sums's sums go: `rows` rows of V elements split so that rows * chunks blocks of `threads` fill the
// GPU, and their slots in a workspace (bytes() of it, from `base` on, 8-byte aligned). More slots than one launch's
// grid holds: std::invalid_argument naming op.
struct ChunkLayout {
  RowSplit split;
  int64_t slots;

  int64_t bytes() const { return slots * static_cast<int64_t>(2 * sizeof(unsigned long long) + sizeof(int)); }
  ChunkSums at(void* base) const {
    auto* sums = static_cast<unsigned long long*>(base);
    return ChunkSums{sums, sums + slots, reinterpret_cast<int*>(sums + 2 * slots), split.chunks, split.chunk_len};
  }
};
inline ChunkLayout chunk_layout(int64_t rows, int64_t V, FloatKind kind, int threads, const char* op) {
  const RowSplit split = split_rows(rows, V, tile_elements(kind, threads), multiprocessors());
  if (rows * split.chunks > 0x7fffffff) throw std::invalid_argument(std::string(op) + ": too many rows for one launch");
  return ChunkLayout{split, rows * split.chunks};
}

// The first level of row b's draw, by one thread: status kBadValue (a chunk saw a bad value), kZeroMass or kOk;
// plain: the view's weights had no mass and `fallback` let p's own weights stand in; with kOk, the chunk holding
// sample_target(bits, total) and the target within it.
struct ChunkPick {
  int32_t status;
  bool plain;
  int64_t chunk;
  uint64_t target;
};
__device__ inline ChunkPick pick_chunk(const ChunkSums& w, int64_t b, bool fallback, uint64_t bits) {
  const int64_t first = b * w.chunks;
  uint64_t weighted = 0, plain = 0;
  int any_bad = 0;
  for (int64_t c = 0; c < w.chunks; ++c) {
    weighted += w.weighted[first + c];
    plain += w.plain[first + c];
    any_bad |= w.bad[first + c];
  }
  ChunkPick pick{accept::kOk, fallback && weighted == 0, 0, 0};
  const uint64_t total = pick.plain ? plain : weighted;
  if (any_bad || total == 0) {
    pick.status = any_bad ? accept::kBadValue : accept::kZeroMass;
    return pick;
  }
  const unsigned long long* sums = (pick.plain ? w.plain : w.weighted) + first;
  uint64_t target = accept::sample_target(bits, total);
  while (target >= sums[pick.chunk]) target -= sums[pick.chunk++];
  pick.target = target;
  return pick;
}

// The token of `row` in [begin, end) whose inclusive fixed-point prefix sum first exceeds `remaining` (below the
// span's sum), one tile of kThreads * kVecOf<P> tokens at a time (block-wide prefix sums); the thread holding it
// writes it to *s_token. Called by the whole block.
template <typename P, int kThreads, typename Row>
__device__ void block_pick_token(Row row, int64_t begin, int64_t end, uint64_t remaining, unsigned long long* s_warp,
                                 int* s_token) {
  constexpr int kWarps = kThreads / 32, kVec = kVecOf<P>;
  const int tid = threadIdx.x;
  const bool aligned = aligned16(row.p) && (!row.q || aligned16(row.q));
  for (int64_t base = begin; base < end; base += kThreads * kVec) {  // block-uniform trip count
    const int64_t t = base + tid * kVec;
    float xp[kVec], xq[kVec];
    uint64_t wt[kVec];
    const int m = load_span(global_ptr(row.p), t, end, aligned, xp);
    if (row.q) load_span(global_ptr(row.q), t, end, aligned, xq);
    uint64_t mine = 0;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      wt[e] = e < m ? row.weight(t + e, xp[e], row.q ? xq[e] : 0.0f) : 0;
      mine += wt[e];
    }
    uint64_t tile = 0;
    const uint64_t before = block_exclusive_scan<kWarps>(mine, s_warp, &tile);
    if (remaining < tile) {
      if (before <= remaining && remaining < before + mine) {  // exactly one thread holds the target
        uint64_t r = remaining - before;
        int pick = -1;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          if (pick < 0 && r < wt[e]) pick = e;
          if (pick < 0) r -= wt[e];
        }
        *s_token = static_cast<int>(t + pick);
      }
      return;
    }
    remaining -= tile;
  }
}

// Both levels of row b's draw by the whole block, from the chunk sums of `row` in w (status: the row's so far; a
// marked row draws nothing). row.plain() stands in where `row` has no mass and fallback is set.
// Returns the row's status in every thread; with kOk the token is in *s_token.
template <typename P, int kThreads, typename Row>
__device__ int32_t block_draw(const ChunkSums& w, int64_t b, int64_t V, int32_t status, Row row, bool fallback,
                              uint64_t bits, ChunkPick* s_pick, unsigned long long* s_warp, int* s_token) {
  if (threadIdx.x == 0)
    *s_pick = status == accept::kOk ? pick_chunk(w, b, fallback, bits) : ChunkPick{status, false, 0, 0};
  __syncthreads();
  const ChunkPick pick = *s_pick;
  if (pick.status == accept::kOk) {
    const int64_t begin = pick.chunk * w.chunk_len, end = begin + w.chunk_len < V ? begin + w.chunk_len : V;
    if (pick.plain)
      block_pick_token<P, kThreads>(row.plain(), begin, end, pick.target, s_warp, s_token);
    else
      block_pick_token<P, kThreads>(row, begin, end, pick.target, s_warp, s_token);
  }
  __syncthreads();  // every thread has read *s_pick, and *s_token is written
  return pick.status;
}

}  // namespace fastar::cuda
