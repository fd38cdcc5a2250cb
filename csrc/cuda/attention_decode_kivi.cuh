// Decode CUDA kernel of fastar's masked attention over KIVI int4 / int2 caches (docs/quantized_kvcache.md): items of
// at most kDecodeRowsMax query rows, read on the packed codes, one instance per (q dtype, head dim, bits).
//  * Work: the keys of a block's kv split in tiles of one key group (kivi_group keys, a multiple of 32); warp w
//    takes tiles w, w + 4, ... and each tile 32 keys (a chunk) at a time, so a chunk lies in one key group.
//  * Keys, lane = key: the lane reads its key's packed row with 16-byte loads (32 int4 or 64 int2 codes each).
//    The group's scales and zeros are folded into the warp's copy of q once per tile (qs = q * scale per
//    channel, qz = q . zero), so a logit is qs . codes + qz, with q from shared memory as broadcasts. A key at or
//    past the sequence's key split is the window's row, read as T and dotted with q itself.
//  * Values: the chunk's packed rows (16-byte loads, lane = key) go to the warp's shared memory with their float16
//    scales and zeros as float; P.V then has lanes over 8 output columns (one value group: G >= 32) and the
//    32 / (D / 8) lane phases over keys. A lane adds (p * scale) * code per column and p * zero once per key and
//    row into its group's term, added to its columns at the end. A value at or past the value split is the
//    window's row (8 columns of T per lane).
//  * The online softmax is a warp's per row (core/softmax.h's state, log2 units), as the tiled kernel's: lanes
//    over keys for the max and l, probabilities through shared memory. The warps' states are merged at the end.
// A hidden key (mask, absent, or its page out of range) has probability kHiddenP and is skipped in P.V, so a NaN
// in its rows stays out. qk_norm, head dims other than 64 / 128 / 256, groups that are no multiple of 32 and
// unaligned rows take the tiled kernel (attention.cuh), which dequantizes each staged row.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/kivi_quant.h"
#include "cuda/attention.cuh"
#include "cuda/attention_decode.cuh"

namespace fastar::cuda {

template <typename T, int kD, int kBits>
struct KiviDecodeShape {
  static constexpr int kRows = kDecodeRowsMax;
  static constexpr int kRowBytes = kD * kBits / 8;                     // a key's packed codes
  static constexpr int kRowVecs = kRowBytes / 16;                      // 16-byte loads per packed row
  static constexpr int kVecCodes = 128 / kBits;                        // codes per 16-byte load
  static constexpr int kMaxGroups = kD / 32;                           // value groups per row, at most
  static constexpr int kCols = 8;                                      // P.V: output columns per lane
  static constexpr int kColLanes = kD / kCols;                         // lanes across a row
  static constexpr int kPhases = 32 / kColLanes;                       // keys taken at once by a warp's P.V
  static constexpr int kWindowVec = 16 / static_cast<int>(sizeof(T));  // window elements per 16-byte load
  // Shared memory, floats: q [kRows, kD] (log2 units); per warp: qs [kRows, kD], qz [kRows], p [kRows, 32], value
  // scales and zeros [32, kMaxGroups] each, the chunk's value codes [32, kRowBytes] (16-byte aligned offsets).
  // At the end the warps' states [warps, kRows, kD + 2] reuse it.
  static constexpr int kQ = kRows * kD;
  static constexpr int kQs = 0, kQz = kQs + kRows * kD, kP = kQz + kRows, kVs = kP + kRows * 32;
  static constexpr int kVz = kVs + 32 * kMaxGroups, kVc = kVz + 32 * kMaxGroups, kWarp = kVc + 32 * kRowBytes / 4;
  static constexpr int kFloats = kQ + kAttnWarps * kWarp;
  static constexpr int64_t kBytes = int64_t{kFloats} * 4;
  static_assert(kRowBytes % 16 == 0 && kWarp % 4 == 0 && kQ % 4 == 0, "16-byte rows and aligned regions");
  static_assert(kFloats >= kAttnWarps * kRows * (kD + 2), "the warps' states fit");
  static_assert(kBytes <= 96 * 1024, "fits an sm_80 block's shared memory");
};

// Code i of a word of kBits codes as float, exactly: 2^23 + code has the code in its mantissa (a mask and an add,
// both full rate, where an int-to-float conversion runs at a quarter of it).
template <int kBits>
__device__ __forceinline__ float kivi_code_float(uint32_t word, int i) {
  return __uint_as_float(0x4b000000u | (word >> (kBits * i) & ((1u << kBits) - 1))) - 8388608.0f;
}

// A 16-byte vector of kBits codes as floats, in column order.
template <int kBits>
__device__ __forceinline__ void kivi_codes_to_float(const uint4& raw, float* c) {
  uint32_t w[4];
  memcpy(w, &raw, 16);
  constexpr int kPerWord = 32 / kBits;
#pragma unroll
  for (int i = 0; i < 4 * kPerWord; ++i) c[i] = kivi_code_float<kBits>(w[i / kPerWord], i % kPerWord);
}

template <typename T, int kD, int kBits>
__global__ void __launch_bounds__(kAttnThreads) attention_kivi_decode_kernel(AttentionParams p, AttentionWork w) {
  using S = KiviDecodeShape<T, kD, kBits>;
  constexpr int kRows = S::kRows, kCols = S::kCols;
  FASTAR_DYNAMIC_SMEM(float, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t G = p.kivi_group;
  const BlockItem it = block_item(p, w, G);  // tiles: key groups
  const int R = it.R;
  const MaskGeometry geom = mask_geometry(p, it.b);
  const int64_t lk = it.lk, k_split = p.kivi_split[2 * it.b], v_split = p.kivi_split[2 * it.b + 1];
  const int64_t n_groups = kD / G;  // value groups per row

  float* s_q = smem;
  float* s_w = smem + S::kQ + warp * S::kWarp;
  float* s_qs = s_w + S::kQs;
  float* s_qz = s_w + S::kQz;
  float* s_p = s_w + S::kP;
  float* s_vs = s_w + S::kVs;
  float* s_vz = s_w + S::kVz;
  uint8_t* s_vc = reinterpret_cast<uint8_t*>(s_w + S::kVc);

  // q * scale * log2(e) as float; rows past R are 0.
  const float qscale = p.scale * kLog2e;
  for (int r = warp; r < kRows; r += kAttnWarps) {
    const RowDest rd = it.dest(r < R ? r : 0);
    const T* src = static_cast<const T*>(p.q) + rd.b * p.q_sb + rd.h * p.q_sh + rd.i * p.q_sl;
    for (int d = lane; d < kD; d += 32) s_q[r * kD + d] = r < R ? to_float(src[d]) * qscale : 0.0f;
  }
  __syncthreads();

  RowState st[kRows];  // l: this lane's share, summed over the warp at the end
  float o[kRows][kCols], oz[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    st[r] = RowState::init();
    oz[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kCols; ++e) o[r][e] = 0.0f;
  }

  const uint8_t* kbase = static_cast<const uint8_t*>(p.k);
  const uint8_t* vbase = static_cast<const uint8_t*>(p.v);
  const T* k_window = static_cast<const T*>(p.kivi_k_window);
  const T* v_window = static_cast<const T*>(p.kivi_v_window);
  auto window_row = [&](const T* window, int64_t j) {
    return window + ((it.b * p.kivi_window_len + j % p.kivi_window_len) * p.Hkv + it.hkv) * kD;
  };
  const T* bias = static_cast<const T*>(p.mask.bias);
  const bool masked = p.mask.causal || p.mask.window || p.mask.block != BlockRelation::kNone || p.mask.bits ||
                      p.mask.scale_window >= 0 || bias;
  const int col_lane = lane % S::kColLanes, phase = lane / S::kColLanes, col0 = col_lane * kCols;
  const int vgroup = static_cast<int>(col0 / G);  // the value group of this lane's columns

  for (int64_t t = it.t_begin + warp; t < it.t_end; t += kAttnWarps) {  // warp-uniform
    const int64_t g0 = t * G, g1 = min64(g0 + G, lk);
    for (int64_t j0 = g0; j0 < g1; j0 += 32) {
      const int64_t j = j0 + lane;
      KvRows kv{};
      const bool ok = j < g1 && kv_rows(p, it.b, it.hkv, j, &kv);
      const bool k_codes = j0 < k_split;  // warp-uniform: k_split is a multiple of G
      const bool v_codes = ok && j < v_split;
      // The chunk's loads first: its K and V codes, 16 bytes at a time, and its V scales and zeros.
      uint4 kraw[S::kRowVecs], vraw[S::kRowVecs];
#pragma unroll
      for (int x = 0; x < S::kRowVecs; ++x) {
        kraw[x] = ok && k_codes ? *reinterpret_cast<const uint4*>(kbase + kv.k + 16 * x) : make_uint4(0, 0, 0, 0);
        vraw[x] = v_codes ? *reinterpret_cast<const uint4*>(vbase + kv.v + 16 * x) : make_uint4(0, 0, 0, 0);
      }
      const int64_t v_meta = kv.v / S::kRowBytes * n_groups;  // (slot * Hkv + head) * D / G
#pragma unroll
      for (int g = 0; g < S::kMaxGroups; ++g) {
        const bool in = v_codes && g < n_groups;
        s_vs[lane * S::kMaxGroups + g] = in ? half_to_float(p.kivi_v_scale[v_meta + g]) : 0.0f;
        s_vz[lane * S::kMaxGroups + g] = in ? half_to_float(p.kivi_v_zero[v_meta + g]) : 0.0f;
      }
#pragma unroll
      for (int x = 0; x < S::kRowVecs; ++x) reinterpret_cast<uint4*>(s_vc + lane * S::kRowBytes)[x] = vraw[x];
      // The tile's first chunk folds its key group's scales and zeros into q (its keys share a page).
      const bool fold_ok = __shfl_sync(kFullMask, ok, 0);
      if (j0 == g0 && k_codes && fold_ok) {
        const int64_t at = __shfl_sync(kFullMask, kv.k, 0);
        const int64_t meta = (at / S::kRowBytes / p.Hkv / G * p.Hkv + it.hkv) * kD;
        float qz[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) qz[r] = 0.0f;
#pragma unroll
        for (int d = lane; d < kD; d += 32) {
          const float sc = half_to_float(p.kivi_k_scale[meta + d]), z = half_to_float(p.kivi_k_zero[meta + d]);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r >= R) break;
            s_qs[r * kD + d] = s_q[r * kD + d] * sc;
            qz[r] = fmaf(s_q[r * kD + d], z, qz[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= R) break;
          qz[r] = warp_sum(qz[r]);
          if (lane == 0) s_qz[r] = qz[r];
        }
      }
      __syncwarp();

      // Logits of this lane's key (log2 units).
      float s[kRows];
      if (k_codes) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] = r < R ? s_qz[r] : 0.0f;
#pragma unroll
        for (int x = 0; x < S::kRowVecs; ++x) {
          float c[S::kVecCodes];
          kivi_codes_to_float<kBits>(kraw[x], c);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r >= R) break;
            const float* qs = s_qs + r * kD + x * S::kVecCodes;
#pragma unroll
            for (int e = 0; e < S::kVecCodes; ++e) s[r] = fmaf(qs[e], c[e], s[r]);
          }
        }
      } else {
        const T* row = window_row(k_window, ok ? j : j0);
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] = 0.0f;
#pragma unroll 2
        for (int x = 0; x < kD / S::kWindowVec; ++x) {
          const uint4 raw = ok ? reinterpret_cast<const uint4*>(row)[x] : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (r >= R) break;
            const float* q = s_q + r * kD + x * S::kWindowVec;
#pragma unroll
            for (int e = 0; e < S::kWindowVec; ++e) s[r] = fmaf(q[e], vector_element<T>(raw, e), s[r]);
          }
        }
      }
      // Bit r: the key is hidden from row r (absent, or masked). A visible key's bias (or 0) is staged in the
      // lane's own probability slot: a rolled loop (one copy of the mask code) cannot index s in registers.
      uint32_t hidden = ok ? 0u : ~0u;
      const bool staged = ok && masked;
      if (staged) {
#pragma unroll 1
        for (int r = 0; r < R; ++r) {
          const RowDest rd = it.dest(r);
          float add = 0.0f;
          if (!mask_visible(p.mask, it.b, rd.i, j, geom)) {
            hidden |= 1u << r;
          } else if (bias) {
            add = to_float(bias[rd.b * p.mask.bias_sb + rd.h * p.mask.bias_sh + rd.i * p.mask.bias_sq + j]) * kLog2e;
          }
          s_p[r * 32 + lane] = add;
        }
      }
      // Online softmax per row over the chunk (hidden logits replaced, not added to: a NaN stays out).
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= R) break;  // block-uniform
        const bool hid = hidden >> r & 1;
        const float sr = hid ? -INFINITY : staged ? s[r] + s_p[r * 32 + lane] : s[r];
        const float mx = warp_softmax_max(sr);
        float pr = 0.0f;
        if (mx != -INFINITY) {  // warp-uniform
          const float corr = st[r].update(mx);
          pr = st[r].prob(sr);
          st[r].add(pr);
          oz[r] *= corr;
#pragma unroll
          for (int e = 0; e < kCols; ++e) o[r][e] *= corr;
        }
        s_p[r * 32 + lane] = hid ? kHiddenP : pr;
      }
      __syncwarp();
      // o += p V: lanes over columns, phases over keys.
      const int nk = static_cast<int>(min64(32, g1 - j0));  // the chunk's keys
#pragma unroll 2
      for (int kc = phase; kc < nk; kc += S::kPhases) {
        float pr[kRows];
        bool any = false;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          pr[r] = r < R ? s_p[r * 32 + kc] : kHiddenP;
          any |= !(pr[r] < 0.0f);  // NaN included
        }
        if (!any) continue;
        float x[kCols];
        float vs = 1.0f, vz = 0.0f;
        if (j0 + kc < v_split) {
          uint32_t word = 0;
          memcpy(&word, s_vc + kc * S::kRowBytes + col_lane * (kCols * kBits / 8), kCols * kBits / 8);
#pragma unroll
          for (int e = 0; e < kCols; ++e) x[e] = kivi_code_float<kBits>(word, e);
          vs = s_vs[kc * S::kMaxGroups + vgroup];
          vz = s_vz[kc * S::kMaxGroups + vgroup];
        } else {
          const T* row = window_row(v_window, j0 + kc) + col0;
#pragma unroll
          for (int e0 = 0; e0 < kCols; e0 += S::kWindowVec) {
            const uint4 raw = *reinterpret_cast<const uint4*>(row + e0);
#pragma unroll
            for (int e = 0; e < S::kWindowVec && e0 + e < kCols; ++e) x[e0 + e] = vector_element<T>(raw, e);
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= R) break;
          if (pr[r] < 0.0f) continue;  // hidden from the row: its V row (even NaN) stays out
          const float ps = pr[r] * vs;
          oz[r] = fmaf(pr[r], vz, oz[r]);
#pragma unroll
          for (int e = 0; e < kCols; ++e) o[r][e] = fmaf(ps, x[e], o[r][e]);
        }
      }
      __syncwarp();  // the chunk's shared memory is read before the next one's is written
    }
  }

  // Each row's output: the zero terms added to their columns, the phases summed; then the warps' states merged.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= R) break;
    st[r].l = warp_sum(st[r].l);
#pragma unroll
    for (int e = 0; e < kCols; ++e) {
      float v = o[r][e] + oz[r];
#pragma unroll
      for (int m = S::kColLanes; m < 32; m <<= 1) v += __shfl_xor_sync(kFullMask, v, m);
      o[r][e] = v;
    }
  }
  __syncthreads();  // every warp is done with q; the states reuse the shared memory
  float* s_state = smem;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= R) break;
    float* dst = s_state + (warp * kRows + r) * (kD + 2);
    if (lane == 0) {
      dst[0] = st[r].m;
      dst[1] = st[r].l;
    }
    if (phase == 0) {
#pragma unroll
      for (int e = 0; e < kCols; ++e) dst[2 + col0 + e] = o[r][e];
    }
  }
  __syncthreads();
  for (int r = warp; r < R; r += kAttnWarps) {
    const float* src = s_state + r * (kD + 2);
    constexpr int64_t kWarpStride = int64_t{kRows} * (kD + 2);
    merge_and_store<T>(
        p, w, it.split, it.dest(r), kAttnWarps, lane,
        [&](int64_t g) { return RowState{src[g * kWarpStride], src[g * kWarpStride + 1]}; },
        [&](int64_t g, int64_t d) { return src[g * kWarpStride + 2 + d]; });
  }
}

}  // namespace fastar::cuda
