// CUDA kernels of fastar's masked attention: online softmax (FlashAttention's recurrence) in float32.
//
// One block (4 warps) per work item (batch, kv head, query tile, head chunk) and kv split (blockIdx.y). The
// item's rows are query heads of one GQA group x query positions, so each K/V tile is loaded once for the
// group. Key tiles are classified against the structured mask first (core/attention.h), 128 tiles at a time
// by one thread each: hidden tiles are skipped, fully visible ones run without per-element mask work.
// Logits and probabilities are in log2 units (scale * log2(e) is folded into q) so exp is one exp2f.
//
// Two shapes of the same kernel (template argument kKeySlices):
//  * tiled (kKeySlices = 1), for longer queries: each warp owns kRowsPerWarp rows; the 32-key K and V
//    tiles are staged in shared memory as float.
//  * decode (kKeySlices > 1), for short queries (few rows): the warps split each tile's keys instead
//    (32 each) and every warp holds all rows; only K is staged, each warp reads the V rows of its own keys
//    from global memory (coalesced, read once). The warps' partial states are merged in shared memory.
// Inside a warp, QK^T has lanes over keys (K rows in shared memory with an odd stride: no bank conflicts;
// q reads are broadcasts), the row max is a warp shuffle reduction, and P.V has lanes over D with the
// probabilities broadcast from shared memory.
// With several kv splits (flash-decoding: few items, long caches), each block writes its unnormalised
// partial output and (max, sum) to a float32 workspace and attention_merge_kernel combines them by LSE.
// Every row's softmax is a core/softmax.h state (its NaN rule included); P.V skips the keys a partial tile's
// mask hides from a row, so a NaN in their V rows stays out of it.
// Quantized K/V (int8 / fp8 codes, a fallback for what the decode and tensor-core kernels do not take): the tiled
// shape stages its tiles as float anyway, so it dequantizes there, code * scale, with one switch over the format
// per staged row. The decode shape reads V rows from global memory as T, so the planner never gives it codes.
// KIVI int4 / int2 caches take the tiled shape where the KIVI decode kernel does not: a staged row is code * scale +
// zero (float16 scale and zero), or the full-precision window's row at or past the sequence's split.
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "core/attention.h"
#include "core/kivi_quant.h"
#include "core/softmax.h"
#include "cuda/common.cuh"
#include "cuda/kv_codes.cuh"

namespace fastar::cuda {

constexpr int kAttnThreads = 128;
// Every kv split gets at least this many keys, so that its partial result is cheap next to its reads.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kClsChunk = kAttnThreads;  // tiles classified per pass, one per thread
constexpr float kLog2e = 1.4426950408889634f;
// Probability slot of a key the mask hides from the row (in a partial tile): P.V skips it.
constexpr float kHiddenP = -1.0f;

using RowState = SoftmaxState<float, Log2Units>;  // logits in log2 units

// What the launcher decided, shared by the attention and merge kernels.
struct AttentionWork {
  int64_t G;              // query heads per kv head
  int64_t ng, nq;         // heads and query positions per item (rows = ng * nq)
  int64_t n_head_chunks;  // ceil(G / ng)
  int64_t n_q_tiles;      // ceil(Lq / nq)
  int64_t splits;         // kv splits (gridDim.y)
  float* part_o;          // [splits, B, Hq, Lq, D] unnormalised outputs, null when splits == 1
  float* part_ml;         // [splits, B, Hq, Lq, 2] their running max and sum (log2 units)
};

// Dynamic shared memory: int64 V row offsets [kBk] (-1: key absent or its page out of range), tile classes
// [kClsChunk], then floats: q [rows, D], K [kBk, D | 1] (reused to merge the decode warps' states), V [kBk, D]
// (tiled only), probabilities [warps, kRowsPerWarp, 32].
struct AttnSmem {
  int ks;                  // K row stride
  int q, k, v, p, floats;  // float offsets and count
  int64_t bytes;
};

template <int kKeySlices, int kRowsPerWarp>
FASTAR_HD AttnSmem attn_smem_layout(int D) {
  constexpr int kRows = kAttnWarps / kKeySlices * kRowsPerWarp, kBk = 32 * kKeySlices;
  AttnSmem s;
  s.ks = D | 1;
  s.q = 0;
  s.k = kRows * D;
  const int k_region = kBk * s.ks, merge_region = kAttnWarps * kRowsPerWarp * (D + 2);
  s.v = s.k + (k_region > merge_region ? k_region : merge_region);
  s.p = s.v + (kKeySlices == 1 ? kBk * D : 0);
  s.floats = s.p + kAttnWarps * kRowsPerWarp * 32;
  s.bytes = int64_t{kBk} * 8 + int64_t{kClsChunk} * 4 + int64_t{s.floats} * 4;
  return s;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

// The max over the warp, NaN if any lane holds NaN.
__device__ __forceinline__ float warp_softmax_max(float v) {
  for (int d = 16; d > 0; d >>= 1) v = softmax_max(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// qk_norm's factor of a row of D elements, with lane reading x[lane::32]; warp-uniform call.
template <typename T>
__device__ __forceinline__ float inv_norm(const T* x, int D, int lane) {
  float ss = 0.0f;
  for (int d = lane; d < D; d += 32) ss += to_float(x[d]) * to_float(x[d]);
  return qk_norm_factor(warp_sum(ss));
}

// Element offsets of key s's K and V rows (head h of sequence b), from one page-table read. False for a key
// whose page is out of range: the CPU glue rejects bad block tables, the CUDA one cannot without a sync.
struct KvRows {
  int64_t k, v;
};
__device__ __forceinline__ bool kv_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t s, KvRows* rows) {
  if (!p.block_table) {
    *rows = KvRows{b * p.k_sb + h * p.k_sh + s * p.k_sl, b * p.v_sb + h * p.v_sh + s * p.v_sl};
    return true;
  }
  const PagePos pp = page_pos(p, s);
  const int64_t page = p.block_table[b * p.bt_sb + pp.column];
  if (page < 0 || page >= p.num_pages) return false;
  *rows = KvRows{page * p.k_sb + h * p.k_sh + pp.row * p.k_sl, page * p.v_sb + h * p.v_sh + pp.row * p.v_sl};
  return true;
}

// Offsets of key s's K and V scales (quantized caches; a key whose page kv_rows accepted).
__device__ __forceinline__ KvRows kv_scale_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t s) {
  return KvRows{kv_row_offset(p, p.ks_sb, p.ks_sh, p.ks_sl, b, h, s),
                kv_row_offset(p, p.vs_sb, p.vs_sh, p.vs_sl, b, h, s)};
}

template <KvFormat F>
__device__ __forceinline__ void dequantize_row(const uint8_t* row, float scale, float* dst, int D, int lane) {
  for (int d = lane; d < D; d += 32) dst[d] = code_to_float<F>(row[d]) * scale;
}

// One KIVI K or V row (core/attention.h's kivi_* fields): the window's row in T at or past the sequence's split,
// else code * scale + zero from packed codes (float16 scales and zeros: keys per channel and group of kivi_group
// tokens, values per token and group of kivi_group channels).
template <typename T>
struct KiviRow {
  const T* window;  // null: quantized
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t per;  // channels per scale: 1 (keys) or kivi_group (values)
  int bits;

  __device__ __forceinline__ float value_at(int64_t d) const {
    if (window) return to_float(window[d]);
    const uint32_t c = codes[d * bits / 8] >> (d * bits % 8) & ((1u << bits) - 1);
    return fmaf(static_cast<float>(c), half_to_float(scale[d / per]), half_to_float(zero[d / per]));
  }
  // Elements 8 c .. 8 c + 7 into x: 16-byte loads of the window's row and of keys' scales and zeros (rows and
  // scale arrays 16-byte aligned, D a multiple of 8), codes from one word.
  __device__ __forceinline__ void chunk8(int c, float* x) const {
    if (window) {
      T w[8];
      memcpy(w, window + 8 * c, 16);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = to_float(w[e]);
      return;
    }
    uint32_t word;  // 8 codes of `bits` bits
    if (bits == 4) {
      memcpy(&word, codes + 4 * c, 4);
    } else {
      uint16_t two;
      memcpy(&two, codes + 2 * c, 2);
      word = two;
    }
    if (per == 1) {
      uint16_t sc[8], ze[8];
      memcpy(sc, scale + 8 * c, 16);
      memcpy(ze, zero + 8 * c, 16);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        x[e] = fmaf(static_cast<float>(word >> (e * bits) & ((1u << bits) - 1)), half_to_float(sc[e]),
                    half_to_float(ze[e]));
      return;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t g = (8 * c + e) / per;
      x[e] = fmaf(static_cast<float>(word >> (e * bits) & ((1u << bits) - 1)), half_to_float(scale[g]),
                  half_to_float(zero[g]));
    }
  }
};

// Key s's K (value = false) or V row of head h of sequence b, whose packed codes lie at byte offset `at` of the
// cache; `codes` is where they are read (the cache's, or a copy of them).
template <typename T>
__device__ __forceinline__ KiviRow<T> kivi_row(const AttentionParams& p, int64_t b, int64_t h, int64_t s, int64_t at,
                                               bool value, const uint8_t* codes) {
  const int bits = p.kivi_bits;
  const int64_t D = p.D, G = p.kivi_group;
  if (s >= p.kivi_split[2 * b + value]) {
    const T* row = static_cast<const T*>(value ? p.kivi_v_window : p.kivi_k_window) +
                   ((b * p.kivi_window_len + s % p.kivi_window_len) * p.Hkv + h) * D;
    return KiviRow<T>{row, nullptr, nullptr, nullptr, 1, bits};
  }
  const int64_t slot_head = at / (D * bits / 8);  // slot * Hkv + head
  const int64_t meta = value ? slot_head * (D / G) : (slot_head / p.Hkv / G * p.Hkv + h) * D;
  return KiviRow<T>{nullptr,
                    codes,
                    (value ? p.kivi_v_scale : p.kivi_k_scale) + meta,
                    (value ? p.kivi_v_zero : p.kivi_k_zero) + meta,
                    value ? G : 1,
                    bits};
}

// kivi_row's row as float into dst (lanes over D).
template <typename T>
__device__ __forceinline__ void kivi_row_to_float(const AttentionParams& p, int64_t b, int64_t h, int64_t s, int64_t at,
                                                  bool value, float* dst, int D, int lane) {
  const KiviRow<T> row = kivi_row<T>(p, b, h, s, at, value, static_cast<const uint8_t*>(value ? p.v : p.k) + at);
  for (int d = lane; d < D; d += 32) dst[d] = row.value_at(d);
}

// A row of D codes of format f times scale, as float into dst (lanes over D); the format is chosen once per row.
__device__ __forceinline__ void dequantize_row(KvFormat f, const uint8_t* row, float scale, float* dst, int D,
                                               int lane) {
  switch (f) {
    case KvFormat::kInt8:
      return dequantize_row<KvFormat::kInt8>(row, scale, dst, D, lane);
    case KvFormat::kFp8E4M3:
      return dequantize_row<KvFormat::kFp8E4M3>(row, scale, dst, D, lane);
    case KvFormat::kFp8E5M2:
      return dequantize_row<KvFormat::kFp8E5M2>(row, scale, dst, D, lane);
  }
}

// s[r] = q[r] . k for the first N rows (q rows of stride D in shared memory, all lanes the same address).
template <int N, int kRows>
__device__ __forceinline__ void qk_rows(const float* __restrict__ q, const float* __restrict__ k, int D,
                                        float (&s)[kRows]) {
  float a[N];
#pragma unroll
  for (int r = 0; r < N; ++r) a[r] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    const float kd = k[d];
#pragma unroll
    for (int r = 0; r < N; ++r) a[r] = fmaf(q[r * D + d], kd, a[r]);
  }
#pragma unroll
  for (int r = 0; r < N; ++r) s[r] = a[r];
}

// qk_rows for a run-time row count 1 <= n <= kRows (decode: often one or two rows of eight).
template <int kRows, int N = kRows>
__device__ __forceinline__ void qk_upto(int n, const float* q, const float* k, int D, float (&s)[kRows]) {
  if constexpr (N > 1) {
    if (n <= N / 2) return qk_upto<kRows, N / 2>(n, q, k, D, s);
  }
  qk_rows<N>(q, k, D, s);
}

// V rows of the tile staged in shared memory (tiled kernel).
struct SmemValues {
  const float* v;  // [kBk, D]
  int D;
  template <int kDC>
  __device__ __forceinline__ bool load(int c, int lane, float (&x)[kDC]) const {
#pragma unroll
    for (int i = 0; i < kDC; ++i) {
      const int d = lane + 32 * i;
      x[i] = d < D ? v[c * D + d] : 0.0f;
    }
    return true;
  }
};

// V rows read from global memory by the warp that owns the key (decode kernel).
template <typename T>
struct GlobalValues {
  const T* v;
  const int64_t* off;  // row offsets in shared memory, -1: skip the key
  int D;
  template <int kDC>
  __device__ __forceinline__ bool load(int c, int lane, float (&x)[kDC]) const {
    const int64_t o = off[c];
    if (o < 0) return false;
#pragma unroll
    for (int i = 0; i < kDC; ++i) {
      const int d = lane + 32 * i;
      x[i] = d < D ? to_float(v[o + d]) : 0.0f;
    }
    return true;
  }
};

// acc[r] += sum over keys c < nk of p[r][c] * V[c] for the first N rows; p rows of stride 32 in shared memory.
// kMasked (partial tiles): keys whose p is kHiddenP are skipped, so 0 * NaN of a hidden V row cannot leak.
template <int N, bool kMasked, int kRows, int kDC, typename Values>
__device__ __forceinline__ void pv_rows(const Values& vals, int c0, int nk, const float* __restrict__ p, int lane,
                                        float (&acc)[kRows][kDC]) {
#pragma unroll 2
  for (int c = 0; c < nk; ++c) {
    float x[kDC];
    if (!vals.load(c0 + c, lane, x)) continue;
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const float pr = p[r * 32 + c];
#pragma unroll
      for (int i = 0; i < kDC; ++i) acc[r][i] = kMasked && pr < 0.0f ? acc[r][i] : fmaf(pr, x[i], acc[r][i]);
    }
  }
}

template <int kRows, bool kMasked, int kDC, typename Values, int N = kRows>
__device__ __forceinline__ void pv_upto(int n, const Values& vals, int c0, int nk, const float* p, int lane,
                                        float (&acc)[kRows][kDC]) {
  if constexpr (N > 1) {
    if (n <= N / 2) return pv_upto<kRows, kMasked, kDC, Values, N / 2>(n, vals, c0, nk, p, lane, acc);
  }
  pv_rows<N, kMasked>(vals, c0, nk, p, lane, acc);
}

// P.V of a tile for the warp's first n rows: masked for a partial tile (warp-uniform choice).
template <int kRows, bool kStaged, int kDC, typename Values>
__device__ __forceinline__ void pv_tile(bool masked, int n, const Values& vals, int c0, int nk, const float* p,
                                        int lane, float (&acc)[kRows][kDC]) {
  if constexpr (kStaged) {
    if (masked) return pv_rows<kRows, true>(vals, c0, nk, p, lane, acc);
    pv_rows<kRows, false>(vals, c0, nk, p, lane, acc);
  } else {
    if (masked) return pv_upto<kRows, true>(n, vals, c0, nk, p, lane, acc);
    pv_upto<kRows, false>(n, vals, c0, nk, p, lane, acc);
  }
}

// Where row r of an item goes: normalised into out/lse, or (split) unnormalised into the workspace.
struct RowDest {
  int64_t b, h, i;
};

// A block's work item (blockIdx.x) and kv split (blockIdx.y): its rows, its sequence's keys and its key tiles
// (tiles of kBk keys; a kv_lens entry outside [0, Lk] is rejected on the CPU only, so lk is clamped).
struct BlockItem {
  int64_t b, hkv, split, i0, g0, G;
  int nq, ng, R;  // row r < R: head hkv * G + g0 + r / nq at position i0 + r % nq
  int64_t lk, t_begin, t_end;
  __device__ RowDest dest(int r) const { return RowDest{b, hkv * G + g0 + r / nq, i0 + r % nq}; }
};

__device__ __forceinline__ BlockItem block_item(const AttentionParams& p, const AttentionWork& w, int64_t bk) {
  BlockItem it;
  int64_t item = blockIdx.x;
  const int64_t qt = item % w.n_q_tiles;
  item /= w.n_q_tiles;
  const int64_t hc = item % w.n_head_chunks;
  item /= w.n_head_chunks;
  it.hkv = item % p.Hkv;
  it.b = item / p.Hkv;
  it.split = blockIdx.y;
  it.i0 = qt * w.nq;
  it.g0 = hc * w.ng;
  it.G = w.G;
  it.nq = static_cast<int>(min64(w.nq, p.Lq - it.i0));
  it.ng = static_cast<int>(min64(w.ng, w.G - it.g0));
  it.R = it.nq * it.ng;
  it.lk = max64(0, min64(kv_len(p, it.b), p.Lk));
  // The launch has w.splits splits (from the capacity Lk); the keys this sequence really has use only as many
  // as give each kMinKeysPerSplit keys, so a short sequence in a long cache is not cut into slivers. Decided
  // here, on the device, from kv_lens: no host sync, CUDA-graph safe. Splits past them write empty states.
  const int64_t useful = min64(w.splits, max64(1, it.lk / kMinKeysPerSplit));
  const int64_t tiles = (it.lk + bk - 1) / bk, per_split = (tiles + useful - 1) / useful;
  it.t_begin = min64(tiles, it.split * per_split);
  it.t_end = min64(tiles, it.t_begin + per_split);
  return it;
}

// The TileClass of each of the item's key tiles c0 .. c0 + nt - 1 into out[0, nt), one tile per thread
// (nt <= blockDim.x). Block-wide: barriers before (the previous chunk's classes have been read) and after.
__device__ __forceinline__ void classify_chunk(const AttentionParams& p, const BlockItem& it, const MaskGeometry& geom,
                                               int64_t c0, int nt, int64_t bk, int* out) {
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < nt) {
    const int64_t j0 = (c0 + tid) * bk;
    out[tid] = static_cast<int>(classify_tile(p.mask, it.b, it.i0, it.i0 + it.nq, j0, min64(it.lk, j0 + bk), geom));
  }
  __syncthreads();
}

// Column d of a row's accumulated output o: o * inv_l (RowState::inv_l) into out, or o as it is (split).
template <typename T>
__device__ __forceinline__ void store_value(const AttentionParams& p, const AttentionWork& w, int64_t split,
                                            const RowDest& rd, int64_t d, float o, float inv_l) {
  if (w.part_o) {
    const int64_t row = ((split * p.B + rd.b) * p.Hq + rd.h) * p.Lq + rd.i;
    w.part_o[row * p.D + d] = o;
  } else {
    T* dst = static_cast<T*>(p.out) + rd.b * p.o_sb + rd.h * p.o_sh + rd.i * p.o_sl;
    dst[d] = from_float<T>(o * inv_l);
  }
}

// A row's state: its LSE into lse, or the state itself (split).
__device__ __forceinline__ void store_stats(const AttentionParams& p, const AttentionWork& w, int64_t split,
                                            const RowDest& rd, const RowState& st) {
  const int64_t row = (rd.b * p.Hq + rd.h) * p.Lq + rd.i;
  if (w.part_o) {
    w.part_ml[(split * p.B * p.Hq * p.Lq + row) * 2] = st.m;
    w.part_ml[(split * p.B * p.Hq * p.Lq + row) * 2 + 1] = st.l;
  } else if (p.lse) {
    p.lse[row] = st.lse();
  }
}

// Merges n partial states of one row, state(s) with output columns value(s, d), and stores the result; one
// warp per row, lanes over D (each lane folds the states for its own columns).
template <typename T, typename StateAt, typename ValueAt>
__device__ __forceinline__ void merge_and_store(const AttentionParams& p, const AttentionWork& w, int64_t split,
                                                const RowDest& rd, int64_t n, int lane, StateAt state, ValueAt value) {
  RowState st = RowState::init();
  for (int64_t d = lane; d < p.D; d += 32) {
    st = RowState::init();
    float o = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      const RowState::MergeWeights wgt = st.merge(state(s));
      o = fmaf(value(s, d), wgt.other, o * wgt.self);
    }
    store_value<T>(p, w, split, rd, d, o, st.inv_l());
  }
  if (lane == 0) store_stats(p, w, split, rd, st);  // lane 0 folded column 0
}

template <typename T, int kDC, int kRowsPerWarp, int kKeySlices>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(AttentionParams p, AttentionWork w) {
  constexpr int kRowGroups = kAttnWarps / kKeySlices;
  constexpr int kRows = kRowGroups * kRowsPerWarp;  // rows per block
  constexpr int kBk = 32 * kKeySlices;              // keys per tile
  constexpr bool kStageV = kKeySlices == 1;
  static_assert(kAttnWarps % kKeySlices == 0, "the warps must divide evenly into key slices");

  const int D = static_cast<int>(p.D);
  const AttnSmem lay = attn_smem_layout<kKeySlices, kRowsPerWarp>(D);
  FASTAR_DYNAMIC_SMEM(unsigned char, smem);
  int64_t* s_voff = reinterpret_cast<int64_t*>(smem);
  int* s_cls = reinterpret_cast<int*>(s_voff + kBk);
  float* s_f = reinterpret_cast<float*>(s_cls + kClsChunk);
  float* s_q = s_f + lay.q;
  float* s_k = s_f + lay.k;
  float* s_v = s_f + lay.v;
  float* s_p = s_f + lay.p;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = warp % kKeySlices, group = warp / kKeySlices;

  const BlockItem it = block_item(p, w, kBk);
  const int64_t b = it.b, hkv = it.hkv, split = it.split, lk = it.lk;
  const int R = it.R;
  auto dest = [&](int r) { return it.dest(r); };

  // q * scale * log2(e) in float; rows past R are zero (their logits are masked anyway).
  const float qscale = p.scale * kLog2e;
  for (int r = warp; r < kRows; r += kAttnWarps) {
    float* dst = s_q + r * D;
    if (r < R) {
      const RowDest rd = dest(r);
      const T* src = static_cast<const T*>(p.q) + rd.b * p.q_sb + rd.h * p.q_sh + rd.i * p.q_sl;
      float f = qscale;
      if (p.qk_norm) f *= (p.q_scale ? p.q_scale[rd.h] : 1.0f) * inv_norm(src, D, lane);
      for (int d = lane; d < D; d += 32) dst[d] = to_float(src[d]) * f;
    } else {
      for (int d = lane; d < D; d += 32) dst[d] = 0.0f;
    }
  }

  // A kv_lens entry outside [0, Lk] is rejected on the CPU only; clamping keeps every read in bounds.
  const MaskGeometry geom = mask_geometry(p, b);
  const int64_t t_begin = it.t_begin, t_end = it.t_end;

  const int row0 = group * kRowsPerWarp;
  const int nrows = static_cast<int>(max64(0, min64(kRowsPerWarp, R - row0)));  // warp-uniform
  RowState st[kRowsPerWarp];  // l: this lane's share of the row sum, summed over the warp at the end
  float acc[kRowsPerWarp][kDC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    st[r] = RowState::init();
#pragma unroll
    for (int i = 0; i < kDC; ++i) acc[r][i] = 0.0f;
  }
  static_assert(kRowsPerWarp <= 32, "hidden keys are one bit per row");

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const T* bias = static_cast<const T*>(p.mask.bias);
  float* my_p = s_p + warp * kRowsPerWarp * 32;

  for (int64_t c0 = t_begin; c0 < t_end; c0 += kClsChunk) {
    const int nt = static_cast<int>(min64(kClsChunk, t_end - c0));
    classify_chunk(p, it, geom, c0, nt, kBk, s_cls);
    for (int ti = 0; ti < nt; ++ti) {
      const TileClass cls = static_cast<TileClass>(s_cls[ti]);
      if (cls == TileClass::kHidden) continue;  // block-uniform
      const int64_t j0 = (c0 + ti) * kBk;
      const int nk = static_cast<int>(min64(kBk, lk - j0));

      __syncthreads();  // every warp is done with the previous tile's K, V and row offsets
      // Stage the tile: warps over key rows, lanes over D (coalesced).
      for (int c = warp; c < kBk; c += kAttnWarps) {
        const int64_t j = j0 + c;
        KvRows kv{};
        const bool ok = c < nk && kv_rows(p, b, hkv, j, &kv);
        const int64_t voff = ok ? kv.v : -1;
        if (lane == 0) s_voff[c] = voff;
        KvRows sc{};  // quantized: the key's scale offsets
        if (ok && p.kv_quantized && !p.kivi_bits) sc = kv_scale_rows(p, b, hkv, j);
        if (ok) {
          float* kd = s_k + c * lay.ks;
          if (p.kv_quantized) {  // the dequantized row, then (qk_norm) its norm from the same lane's elements
            if (p.kivi_bits) {
              kivi_row_to_float<T>(p, b, hkv, j, kv.k, false, kd, D, lane);
            } else {
              dequantize_row(p.kv_format, static_cast<const uint8_t*>(p.k) + kv.k, p.k_scale[sc.k], kd, D, lane);
            }
            if (p.qk_norm) {
              const float f = inv_norm(kd, D, lane);
              for (int d = lane; d < D; d += 32) kd[d] *= f;
            }
          } else if (p.qk_norm) {
            const T* krow = kbase + kv.k;
            const float f = inv_norm(krow, D, lane);
            for (int d = lane; d < D; d += 32) kd[d] = to_float(krow[d]) * f;
          } else {
            const T* krow = kbase + kv.k;
            for (int d = lane; d < D; d += 32) kd[d] = to_float(krow[d]);
          }
        }
        if constexpr (kStageV) {
          float* vd = s_v + c * D;
          if (ok && p.kivi_bits) {
            kivi_row_to_float<T>(p, b, hkv, j, voff, true, vd, D, lane);
          } else if (ok && p.kv_quantized) {
            dequantize_row(p.kv_format, static_cast<const uint8_t*>(p.v) + voff, p.v_scale[sc.v], vd, D, lane);
          } else {
            for (int d = lane; d < D; d += 32) vd[d] = ok ? to_float(vbase[voff + d]) : 0.0f;  // p = 0 there, no NaN
          }
        }
      }
      __syncthreads();
      if (nrows == 0) continue;  // a warp without rows (short item) only helps with the loads

      // Logits of this lane's key for the warp's rows.
      const int c = slice * 32 + lane;
      const int64_t j = j0 + c;
      const bool key_ok = c < nk && s_voff[c] >= 0;
      float s[kRowsPerWarp];
      if constexpr (kKeySlices > 1) {
        qk_upto<kRowsPerWarp>(nrows, s_q + row0 * D, s_k + c * lay.ks, D, s);
      } else {
        qk_rows<kRowsPerWarp>(s_q + row0 * D, s_k + c * lay.ks, D, s);
      }
      // Mask terms of a partial tile: a bit per hidden row, and the bias (or 0) of each visible one staged
      // in this lane's own probability slots: a rolled loop keeps one copy of the mask code, not kRowsPerWarp.
      const bool masked = cls == TileClass::kPartial;  // block-uniform
      uint32_t hidden = 0;
      if (masked && key_ok) {
#pragma unroll 1
        for (int r = 0; r < nrows; ++r) {
          const RowDest rd = dest(row0 + r);
          float add = 0.0f;
          if (!mask_visible(p.mask, b, rd.i, j, geom)) {
            hidden |= 1u << r;
          } else if (bias) {
            add = to_float(bias[rd.b * p.mask.bias_sb + rd.h * p.mask.bias_sh + rd.i * p.mask.bias_sq + j]) * kLog2e;
          }
          my_p[r * 32 + lane] = add;
        }
      }
      // Hidden logits are replaced, not added -inf to: a NaN logit of a hidden key stays out of the row.
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r >= nrows || !key_ok || (hidden >> r & 1)) {
          s[r] = -INFINITY;
        } else if (masked) {
          s[r] += my_p[r * 32 + lane];
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        float pr = 0.0f;  // rows past nrows: 0, so P.V over all kRowsPerWarp rows stays finite
        const float mx = r < nrows ? warp_softmax_max(s[r]) : -INFINITY;
        if (mx != -INFINITY) {  // warp-uniform: the row sees some key of this slice (or a NaN logit)
          const float corr = st[r].update(mx);
          pr = st[r].prob(s[r]);
          st[r].add(pr);
#pragma unroll
          for (int i = 0; i < kDC; ++i) acc[r][i] *= corr;
        }
        my_p[r * 32 + lane] = hidden >> r & 1 ? kHiddenP : pr;
      }
      __syncwarp();
      // o += p V: lanes over D, each V row read once for all the warp's rows.
      const int nkw = static_cast<int>(max64(0, min64(32, nk - slice * 32)));
      if constexpr (kStageV) {
        pv_tile<kRowsPerWarp, true>(masked, nrows, SmemValues{s_v, D}, slice * 32, nkw, my_p, lane, acc);
      } else {
        pv_tile<kRowsPerWarp, false>(masked, nrows, GlobalValues<T>{vbase, s_voff, D}, slice * 32, nkw, my_p, lane,
                                     acc);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (r < nrows) st[r].l = warp_sum(st[r].l);
  }

  if constexpr (kKeySlices == 1) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (r >= nrows) break;
      const RowDest rd = dest(row0 + r);
      const float inv_l = st[r].inv_l();
#pragma unroll
      for (int i = 0; i < kDC; ++i) {
        const int d = lane + 32 * i;
        if (d < D) store_value<T>(p, w, split, rd, d, acc[r][i], inv_l);
      }
      if (lane == 0) store_stats(p, w, split, rd, st[r]);
    }
  } else {
    // Merge the key slices' states of each row: [warp][row][m, l, acc[D]] in the K area.
    float* s_m = s_k;
    __syncthreads();  // every warp is done with K
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (r >= nrows) break;
      float* dst = s_m + (warp * kRowsPerWarp + r) * (D + 2);
      if (lane == 0) {
        dst[0] = st[r].m;
        dst[1] = st[r].l;
      }
#pragma unroll
      for (int i = 0; i < kDC; ++i) {
        const int d = lane + 32 * i;
        if (d < D) dst[2 + d] = acc[r][i];
      }
    }
    __syncthreads();
    for (int r = warp; r < R; r += kAttnWarps) {
      const float* src = s_m + ((r / kRowsPerWarp) * kKeySlices * kRowsPerWarp + r % kRowsPerWarp) * (D + 2);
      const int64_t slice_stride = int64_t{kRowsPerWarp} * (D + 2);  // the row in the next slice's warp
      merge_and_store<T>(
          p, w, split, dest(r), kKeySlices, lane,
          [&](int64_t sl) { return RowState{src[sl * slice_stride], src[sl * slice_stride + 1]}; },
          [&](int64_t sl, int64_t d) { return src[sl * slice_stride + 2 + d]; });
    }
  }
}

// Combines the kv splits of each row by their LSE: one warp per row of [B, Hq, Lq], lanes over D.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) attention_merge_kernel(AttentionParams p, AttentionWork w) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rows = p.B * p.Hq * p.Lq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + warp;
  if (row >= rows) return;  // no barriers below
  const int64_t i = row % p.Lq, h = row / p.Lq % p.Hq, b = row / (p.Lq * p.Hq);
  const float* ml = w.part_ml + row * 2;
  const AttentionWork out_only{w.G, w.ng, w.nq, w.n_head_chunks, w.n_q_tiles, 1, nullptr, nullptr};
  merge_and_store<T>(
      p, out_only, 0, RowDest{b, h, i}, w.splits, lane,
      [&](int64_t s) { return RowState{ml[s * rows * 2], ml[s * rows * 2 + 1]}; },
      [&](int64_t s, int64_t d) { return w.part_o[(s * rows + row) * p.D + d]; });
}

// The head dims the tensor-core and decode kernels are instantiated for, as a compile-time value (D must be one
// of tc_head_dim's: 64, 80, 96, 128, 256; anything else is taken as 256).
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return f(std::integral_constant<int, 256>{});
  }
}

// Lets `kernel` take `bytes` of dynamic shared memory: above 48 KB a kernel must opt in (the emulator has no
// limit to lift). Throws std::runtime_error when the device refuses.
template <typename K>
void allow_dynamic_smem(K* kernel, int64_t bytes) {
#if defined(__CUDACC__)
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("fastar: attention needs ") + std::to_string(bytes) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
  }
#else
  (void)kernel;
  (void)bytes;
#endif
}

}  // namespace fastar::cuda
