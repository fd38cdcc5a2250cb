// Tensor-core CUDA kernel of fastar's masked attention, for bf16 / fp16 items of 16 query rows or more
// (verification, trees, block diffusion, VAR's block-causal pass, prefill). FlashAttention-2's structure:
//  * one block of 4 warps per work item (batch, kv head, query tile of 64 rows = GQA heads x positions, as in
//    attention.cuh) and kv split; each warp owns 16 query rows;
//  * Q, then kBk-key K and V tiles, copied global -> shared by 16-byte cp.async (zero-fill for absent keys and
//    rows), two K/V stages: the next visible tile's copy is in flight while this one is computed;
//  * shared rows in 16-byte chunks, XOR-swizzled by row (D = 64, 128, 256) or padded by one chunk (80, 96):
//    the 8 rows an ldmatrix phase reads fall in 8 different bank groups;
//  * S = Q K^T and O += P V by ldmatrix + mma.sync m16n8k16 with fp32 accumulation; P stays in registers (the
//    accumulator fragment of S is the A fragment of P V); the online softmax is core/softmax.h's state in fp32,
//    log2 units, the scale applied to S in fp32;
//  * key tiles classified against the structured mask first (core/attention.h): hidden tiles are never
//    copied, full tiles run with no per-element mask work.
// NaN rule (docs/attention.md): a NaN or inf in a V row must reach only the rows that see that key. In a
// partial tile such values are zeroed in shared memory before P V and added back, for the rows that see the
// key, from global memory (a path that runs only when V holds a non-finite value).
// Quantized K/V (KV = KvCode<F>, one instance per format): the two stages hold one-byte code tiles (cp.async, half
// the bytes of bf16) and their K and V scales; when a tile's turn comes, one pass converts its codes to T into a
// single T stage (exact for int8 and both fp8 formats), while the next tile's copy is in flight. ldmatrix and
// mma then run as for a T cache. The scales are folded: K's multiplies S (the dot product runs on the codes);
// V's multiplies P before P V, while the row sum l takes P unscaled. P (times V's scale) is rounded to T for
// the mma as P alone is: the same relative rounding, so the tolerance does not change.
// KIVI int4 / int2 (KV = KiviTc<bits>): the stages hold the packed code rows of the quantized keys and values;
// the conversion pass dequantizes each row (a thread per row: code * scale + zero with its group's float16 scale
// and zero, or the window's row at or past the sequence's split) into the T stage, one rounding to T as P gets.
// Roofline at int4, D = 128: a 64-key tile is 8 KB of codes and 2 KB of scales and zeros (bf16: 32 KB), so 64
// query rows do ~210 FLOP a byte, under an H100's 295: HBM-bound at a third of bf16's bytes
// (docs/design/quantized-attention.md).
//
// Roofline (H100 SXM, bf16, dense 989 TFLOP/s, 3.35 TB/s): 4 D FLOPs per visible (query, key) pair; K/V of a
// 64-key tile (D = 128: 32 KB) feed 64 x 64 x 128 x 4 = 2.1 MFLOP per block, 64 FLOP/byte from L2/HBM per
// block, so rows of 64+ queries are tensor-core bound and a GQA group of 4 heads x 16 positions (tree verify)
// still is; the targets per bench row are in docs/design/cuda-attention.md.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/kv_codes.cuh"
#include "cuda/tensor_core.cuh"

namespace fastar::cuda {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcRows = 16 * kTcWarps;  // query rows per block
constexpr int kTcListChunk = 128;       // key tiles classified per pass

// Whether D has a tensor-core instance (a multiple of 16, as mma's k and ldmatrix's 8-column blocks need).
FASTAR_HD constexpr bool tc_head_dim(int64_t D) { return D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }

// The KV argument of attention_tc_kernel over a KIVI cache of kBits-bit codes.
template <int kBits>
struct KiviTc {};
template <typename KV>
inline constexpr int kKiviBits = 0;
template <int kBits>
inline constexpr int kKiviBits<KiviTc<kBits>> = kBits;

template <int kD, bool kCodes = false>
struct TcTile {
  static constexpr int kBk = kD <= 128 ? 64 : 32;  // keys per tile (D = 256: the stages fit 99 KB)
  static constexpr int kChunks = kD / 8;           // 16-byte chunks per row
  static constexpr bool kSwizzle = kChunks % 8 == 0;
  static constexpr int kStride = kSwizzle ? kChunks : kChunks + 1;  // row stride in chunks
  static constexpr int kQElems = kTcRows * kStride * 8;
  static constexpr int kKvElems = kBk * kStride * 8;
  // Element offset of chunk c of row r.
  __device__ __forceinline__ static int at(int r, int c) { return (r * kStride + (kSwizzle ? c ^ (r & 7) : c)) * 8; }
  static constexpr int kStages = kCodes ? 1 : 2;  // T stages of K and V (codes: the code tiles have two)
  static constexpr int kCodeBytes = kBk * kD;     // a K or V code tile, rows of kD bytes
  // Shared memory: Q, K[kStages], V[kStages] (2-byte elements), (codes) K codes[2], V codes[2], key factors
  // [2][kBk] (float; < 0: key absent), (codes) K and V scales [2][kBk] each, the tile list [kTcListChunk] (int), the
  // bad-V key bits [2] and the list length.
  static constexpr int64_t kBytes = int64_t{kQElems + 2 * kStages * kKvElems} * 2 + (kCodes ? 4 * kCodeBytes : 0) +
                                    (kCodes ? 6 : 2) * kBk * 4 + kTcListChunk * 4 + 3 * 4;
  static_assert(kBytes <= 99 * 1024, "an sm_86 / sm_89 block has 99 KB of shared memory");
};

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

// Neither NaN nor +-inf (x - x is NaN for both).
__device__ __forceinline__ bool finite(float x) { return x - x == 0.0f; }

// x[0, N) rounded to T into h; with zero_bad (V rows of a partial tile) a non-finite value becomes 0 and sets bad.
template <int N, typename T>
__device__ __forceinline__ void stage_values(float* x, T* h, bool zero_bad, bool& bad) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (zero_bad && !finite(x[e])) {
      bad = true;
      x[e] = 0.0f;
    }
    h[e] = from_float<T>(x[e]);
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    mma_m16n8k16_bf16(d, a, b, d);
  } else {
    mma_m16n8k16_f16(d, a, b, d);
  }
}

// KV: T, KvCode<F> for an int8 / fp8 cache, KiviTc<bits> for a KIVI cache.
template <typename T, int kD, typename KV = T>
__global__ void __launch_bounds__(kTcThreads, 2) attention_tc_kernel(AttentionParams p, AttentionWork w) {
  constexpr int kKivi = kKiviBits<KV>;               // bits of a KIVI code, 0: none
  constexpr bool kScaled = kIsKvCode<KV>;            // one scale per key folded into S and P
  constexpr bool kCodes = kScaled || kKivi > 0;      // code tiles staged, then converted to T
  using E = std::conditional_t<kCodes, uint8_t, T>;  // what a K/V row holds
  using Tile = TcTile<kD, kCodes>;
  constexpr int kBk = Tile::kBk, kNB = kBk / 8, kDB = kD / 8;  // 8-wide n-blocks of S and of O
  constexpr int kCodeChunks = kD * (kKivi ? kKivi : 8) / 128;  // 16-byte chunks of a row of codes
  static_assert(kCodeChunks * 128 == kD * (kKivi ? kKivi : 8), "whole 16-byte chunks of codes per row");
  FASTAR_DYNAMIC_SMEM(unsigned char, smem);
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + Tile::kQElems;                                                        // [kStages][kKvElems]
  T* s_v = s_k + Tile::kStages * Tile::kKvElems;                                       // [kStages][kKvElems]
  uint8_t* s_kc = reinterpret_cast<uint8_t*>(s_v + Tile::kStages * Tile::kKvElems);    // codes: [2][kCodeBytes]
  uint8_t* s_vc = s_kc + (kCodes ? 2 * Tile::kCodeBytes : 0);                          // codes: [2][kCodeBytes]
  float* s_kf = reinterpret_cast<float*>(s_vc + (kCodes ? 2 * Tile::kCodeBytes : 0));  // [2][kBk]
  float* s_ks = s_kf + 2 * kBk;                                                        // codes: [2][kBk]
  float* s_vs = s_ks + (kCodes ? 2 * kBk : 0);                                         // codes: [2][kBk]
  int* s_list = reinterpret_cast<int*>(s_vs + (kCodes ? 2 * kBk : 0));                 // tile index << 2 | TileClass
  uint32_t* s_bad = reinterpret_cast<uint32_t*>(s_list + kTcListChunk);
  int* s_count = reinterpret_cast<int*>(s_bad + 2);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

  const BlockItem it = block_item(p, w, kBk);
  const int64_t b = it.b, hkv = it.hkv, split = it.split, lk = it.lk;
  const int R = it.R;
  auto dest = [&](int r) { return it.dest(r); };

  // Q rows (zero past R), its own cp.async group.
  for (int x = tid; x < kTcRows * Tile::kChunks; x += kTcThreads) {
    const int r = x / Tile::kChunks, c = x % Tile::kChunks;
    const T* src = static_cast<const T*>(p.q);
    if (r < R) {
      const RowDest rd = dest(r);
      src += rd.b * p.q_sb + rd.h * p.q_sh + rd.i * p.q_sl + c * 8;
    }
    cp_async_16(s_q + Tile::at(r, c), src, r < R ? 16 : 0);
  }
  cp_async_commit();

  const MaskGeometry geom = mask_geometry(p, b);
  const int64_t t_begin = it.t_begin, t_end = it.t_end;
  const E* kbase = static_cast<const E*>(p.k);
  const E* vbase = static_cast<const E*>(p.v);
  // KIVI: the sequence's first k_split keys and v_split values are codes, the later ones the window's.
  const int64_t k_split = kKivi ? p.kivi_split[2 * b] : 0, v_split = kKivi ? p.kivi_split[2 * b + 1] : 0;
  const T* bias = static_cast<const T*>(p.mask.bias);

  // Copies key tile `tile` into stage `st`; key factors 1 (present) or -1 (past the end, or a page out of
  // range: zero-filled, and hidden from every row).
  auto issue = [&](int64_t tile, int st) {
    const int64_t j0 = tile * kBk;
    if constexpr (kCodes) {  // the code tiles and the keys' scales
      for (int x = tid; x < kBk * kCodeChunks; x += kTcThreads) {
        const int r = x / kCodeChunks, c = x % kCodeChunks;
        const int64_t j = j0 + r;
        KvRows kv{};
        const bool ok = j < lk && kv_rows(p, b, hkv, j, &kv);
        const int64_t at = st * Tile::kCodeBytes + r * kD + c * 16;
        if constexpr (kKivi) {  // codes of the quantized rows only; the conversion reads the window's
          const bool kq = ok && j < k_split, vq = ok && j < v_split;
          cp_async_16(s_kc + at, kq ? kbase + kv.k + c * 16 : kbase, kq ? 16 : 0);
          cp_async_16(s_vc + at, vq ? vbase + kv.v + c * 16 : vbase, vq ? 16 : 0);
          if (c == 0) s_kf[st * kBk + r] = ok ? 1.0f : -1.0f;
          continue;
        }
        cp_async_16(s_kc + at, ok ? kbase + kv.k + c * 16 : kbase, ok ? 16 : 0);
        cp_async_16(s_vc + at, ok ? vbase + kv.v + c * 16 : vbase, ok ? 16 : 0);
        if (c == 0) {
          const KvRows sc = ok ? kv_scale_rows(p, b, hkv, j) : KvRows{0, 0};
          cp_async_4(s_ks + st * kBk + r, p.k_scale + sc.k, ok ? 4 : 0);
          cp_async_4(s_vs + st * kBk + r, p.v_scale + sc.v, ok ? 4 : 0);
          s_kf[st * kBk + r] = ok ? 1.0f : -1.0f;
        }
      }
      cp_async_commit();
      return;
    }
    T* kd = s_k + st * Tile::kKvElems;
    T* vd = s_v + st * Tile::kKvElems;
    for (int x = tid; x < kBk * Tile::kChunks; x += kTcThreads) {
      const int r = x / Tile::kChunks, c = x % Tile::kChunks;
      const int64_t j = j0 + r;
      KvRows kv{};
      const bool ok = j < lk && kv_rows(p, b, hkv, j, &kv);
      const E* ks = kbase;
      const E* vs = vbase;
      if (ok) {
        ks += kv.k + c * 8;
        vs += kv.v + c * 8;
      }
      cp_async_16(kd + Tile::at(r, c), ks, ok ? 16 : 0);
      cp_async_16(vd + Tile::at(r, c), vs, ok ? 16 : 0);
      if (c == 0) s_kf[st * kBk + r] = ok ? 1.0f : -1.0f;
    }
    cp_async_commit();
  };

  // This thread's rows: 16 * warp + g (h = 0) and + 8 (h = 1).
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};
  float rowf[2];  // scale * log2(e) (qk_norm: times q_scale[h] / |q row|)
  RowState st[2] = {RowState::init(), RowState::init()};
  float o[kDB][4];
#pragma unroll
  for (int n = 0; n < kDB; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  bool q_ready = false;

  for (int64_t c0 = t_begin; c0 < t_end; c0 += kTcListChunk) {
    const int nt = static_cast<int>(min64(kTcListChunk, t_end - c0));
    classify_chunk(p, it, geom, c0, nt, kBk, s_list);
    if (tid == 0) {  // compact the visible tiles, in order
      int n = 0;
      for (int x = 0; x < nt; ++x) {
        const int cls = s_list[x];
        if (cls != static_cast<int>(TileClass::kHidden)) s_list[n++] = x << 2 | cls;
      }
      *s_count = n;
    }
    __syncthreads();
    const int count = *s_count;
    if (count > 0) issue(c0 + (s_list[0] >> 2), 0);
    for (int n = 0; n < count; ++n) {
      const int stage = n & 1;
      const int64_t j0 = (c0 + (s_list[n] >> 2)) * kBk;
      const bool partial = (s_list[n] & 3) == static_cast<int>(TileClass::kPartial);
      if (n + 1 < count) {
        issue(c0 + (s_list[n + 1] >> 2), stage ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      if (partial && tid == 0) s_bad[0] = s_bad[1] = 0;
      __syncthreads();  // this tile (and Q) landed for every thread

      const T* kt = s_k + (kCodes ? 0 : stage) * Tile::kKvElems;
      T* vt = s_v + (kCodes ? 0 : stage) * Tile::kKvElems;
      float* kf = s_kf + stage * kBk;
      const float* ks = s_ks + stage * kBk;
      const float* vs = s_vs + stage * kBk;
      if constexpr (kKivi) {  // each row dequantized to T by one thread (non-finite V values: as below)
        for (int y = tid; y < 2 * kBk; y += kTcThreads) {
          const bool value = y >= kBk;
          const int r = value ? y - kBk : y;
          KvRows kv{};
          const bool ok = kf[r] > 0.0f && kv_rows(p, b, hkv, j0 + r, &kv);
          const KiviRow<T> row = kivi_row<T>(p, b, hkv, j0 + r, value ? kv.v : kv.k, value,
                                             (value ? s_vc : s_kc) + stage * Tile::kCodeBytes + r * kD);
          bool bad = false;
          T* dst = value ? s_v : s_k;
#pragma unroll 2
          for (int c = 0; c < kD / 8; ++c) {
            float f[8] = {};
            if (ok) row.chunk8(c, f);
            T h[8];
            stage_values<8>(f, h, value && partial, bad);
            memcpy(dst + Tile::at(r, c), h, 16);
          }
          if (bad) atomicOr(&s_bad[r >> 5], 1u << (r & 31));
        }
        __syncthreads();
      } else if constexpr (kCodes) {  // the codes to T (a partial tile's non-finite V values: zeroed, added back below)
        for (int x = tid; x < 2 * kBk * kCodeChunks; x += kTcThreads) {
          const bool value = x >= kBk * kCodeChunks;
          const int y = value ? x - kBk * kCodeChunks : x, r = y / kCodeChunks, c = y % kCodeChunks;
          uint4 raw;
          memcpy(&raw, (value ? s_vc : s_kc) + stage * Tile::kCodeBytes + r * kD + c * 16, 16);
          float f[16];
          codes_to_float<KV::kFormat>(raw, f);
          bool bad = false;
          T h[16];
          stage_values<16>(f, h, value && partial, bad);
          T* dst = value ? s_v : s_k;
          memcpy(dst + Tile::at(r, 2 * c), h, 16);
          memcpy(dst + Tile::at(r, 2 * c + 1), h + 8, 16);
          if (bad) atomicOr(&s_bad[r >> 5], 1u << (r & 31));
        }
        __syncthreads();
      }
      if (!q_ready) {  // once: the rows' factors
        q_ready = true;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float f = p.scale * kLog2e;
          if (p.qk_norm) {
            float ss = 0.0f;
            for (int c = t; c < Tile::kChunks; c += 4) {
              const T* x = s_q + Tile::at(rows[h], c);
              for (int e = 0; e < 8; ++e) ss += to_float(x[e]) * to_float(x[e]);
            }
            ss += __shfl_xor_sync(kFullMask, ss, 1);
            ss += __shfl_xor_sync(kFullMask, ss, 2);
            const int64_t head = rows[h] < R ? dest(rows[h]).h : 0;
            f *= (p.q_scale ? p.q_scale[head] : 1.0f) * qk_norm_factor(ss);
          }
          rowf[h] = f;
        }
      }
      if (p.qk_norm || partial) {
        if (p.qk_norm) {  // the keys' factors 1 / |k row|, kTcThreads / kBk threads per key
          constexpr int kPer = kTcThreads / kBk;
          const int r = tid / kPer;
          float ss = 0.0f;
          for (int c = tid % kPer; c < Tile::kChunks; c += kPer) {
            const T* x = kt + Tile::at(r, c);
            for (int e = 0; e < 8; ++e) ss += to_float(x[e]) * to_float(x[e]);
          }
          for (int m = 1; m < kPer; m <<= 1) ss += __shfl_xor_sync(kFullMask, ss, m);
          if (tid % kPer == 0 && kf[r] > 0.0f) kf[r] = qk_norm_factor(kScaled ? ss * ks[r] * ks[r] : ss);
        }
        if (!kCodes && partial) {  // non-finite V values of a partial tile: zeroed here, added back below
          for (int x = tid; x < kBk * Tile::kChunks; x += kTcThreads) {
            const int r = x / Tile::kChunks;
            T* v8 = vt + Tile::at(r, x % Tile::kChunks);
            bool bad = false;
            for (int e = 0; e < 8; ++e) {
              if (!finite(to_float(v8[e]))) {
                bad = true;
                v8[e] = from_float<T>(0.0f);
              }
            }
            if (bad) atomicOr(&s_bad[r >> 5], 1u << (r & 31));
          }
        }
        __syncthreads();
      }

      // S = Q K^T for the warp's 16 rows.
      float s[kNB][4];
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kD / 16; ++kc) {
        uint32_t a[4];
        const int j = lane >> 3;
        ldmatrix_x4(a, s_q + Tile::at(16 * warp + (lane & 7) + (j & 1) * 8, 2 * kc + (j >> 1)));
#pragma unroll
        for (int nb = 0; nb < kNB; nb += 2) {
          uint32_t bk[4];
          ldmatrix_x4(bk, kt + Tile::at((nb + (j >> 1)) * 8 + (lane & 7), 2 * kc + (j & 1)));
          mma16816<T>(s[nb], a, bk);
          mma16816<T>(s[nb + 1], a, bk + 2);
        }
      }

      // Scale, mask, online softmax. hid: bit h * 16 + 2 nb + e for a key hidden from row h.
      uint32_t hid = 0;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = nb * 8 + 2 * t + e;
          const float f = kf[c];
          const float fs = kScaled ? f * ks[c] : f;  // K's scale folded into the logit
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& x = s[nb][2 * h + e];
            bool hidden = f < 0.0f || rows[h] >= R;
            if (partial && !hidden) {
              const RowDest rd = dest(rows[h]);
              hidden = !mask_visible(p.mask, b, rd.i, j0 + c, geom);
              if (!hidden && bias)
                x = x * rowf[h] * fs +
                    to_float(bias[rd.b * p.mask.bias_sb + rd.h * p.mask.bias_sh + rd.i * p.mask.bias_sq + j0 + c]) *
                        kLog2e;
              else
                x = x * rowf[h] * fs;
            } else {
              x = x * rowf[h] * fs;
            }
            if (hidden) {  // replaced, not added to: a NaN logit of a hidden key stays out of the row
              x = -INFINITY;
              hid |= 1u << (h * 16 + 2 * nb + e);
            }
            mx[h] = softmax_max(mx[h], x);
          }
        }
      }
      float corr[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = softmax_max(mx[h], __shfl_xor_sync(kFullMask, mx[h], 1));
        mx[h] = softmax_max(mx[h], __shfl_xor_sync(kFullMask, mx[h], 2));
        corr[h] = mx[h] == -INFINITY ? 1.0f : st[h].update(mx[h]);  // quad-uniform
      }
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int h = q >> 1;
          const float pr = mx[h] == -INFINITY ? 0.0f : st[h].prob(s[nb][q]);
          st[h].add(pr);
          s[nb][q] = pr;
          // V's scale folded into P; 0 for a hidden key, whose scale (even NaN) stays out of the row.
          if constexpr (kScaled)
            s[nb][q] = hid >> (h * 16 + 2 * nb + (q & 1)) & 1 ? 0.0f : pr * vs[nb * 8 + 2 * t + (q & 1)];
        }
      }
#pragma unroll
      for (int n = 0; n < kDB; ++n) {
        o[n][0] *= corr[0];
        o[n][1] *= corr[0];
        o[n][2] *= corr[1];
        o[n][3] *= corr[1];
      }

      // O += P V: P from the S fragments, V^T fragments by ldmatrix.trans.
#pragma unroll
      for (int kc = 0; kc < kBk / 16; ++kc) {
        const uint32_t a[4] = {pack2(s[2 * kc][0], s[2 * kc][1], T{}), pack2(s[2 * kc][2], s[2 * kc][3], T{}),
                               pack2(s[2 * kc + 1][0], s[2 * kc + 1][1], T{}),
                               pack2(s[2 * kc + 1][2], s[2 * kc + 1][3], T{})};
        const int j = lane >> 3;
#pragma unroll
        for (int n = 0; n < kDB; n += 2) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, vt + Tile::at(kc * 16 + (j & 1) * 8 + (lane & 7), n + (j >> 1)));
          mma16816<T>(o[n], a, bv);
          mma16816<T>(o[n + 1], a, bv + 2);
        }
      }

      if (partial && (s_bad[0] | s_bad[1])) {  // block-uniform; rare: V holds NaN or inf
        for (int c = 0; c < kBk; ++c) {
          if (!(s_bad[c >> 5] >> (c & 31) & 1)) continue;
          // Key c's weight in P for this thread's rows (V's scale folded in), from the lane holding it, and which
          // of the rows see it.
          const int nb = c >> 3, e = c & 1;
          const int src = (lane & ~3) | ((c & 7) >> 1);
          float mine[2] = {0.0f, 0.0f};
          int seen = 0;
#pragma unroll
          for (int x = 0; x < kNB; ++x) {
            if (x != nb) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const bool hd = hid >> (h * 16 + 2 * x + e) & 1;
              mine[h] = hd ? 0.0f : e ? s[x][2 * h + 1] : s[x][2 * h];
              seen |= (hd ? 0 : 1) << h;
            }
          }
          float pc[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) pc[h] = __shfl_sync(kFullMask, mine[h], src);
          seen = __shfl_sync(kFullMask, seen, src);
          const int64_t vat = kv_row_offset(p, p.v_sb, p.v_sh, p.v_sl, b, hkv, j0 + c);
          const E* vrow = vbase + vat;
#pragma unroll
          for (int n = 0; n < kDB; ++n) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const int d = n * 8 + 2 * t + (q & 1);
              float v;
              if constexpr (kKivi) {
                v = kivi_row<T>(p, b, hkv, j0 + c, vat, true, vrow).value_at(d);
              } else if constexpr (kScaled) {
                v = code_to_float<KV::kFormat>(vrow[d]);
              } else {
                v = to_float(vrow[d]);
              }
              if (!finite(v) && (seen >> (q >> 1) & 1)) o[n][q] += pc[q >> 1] * v;
            }
          }
        }
      }
      __syncthreads();  // every warp is done with this stage before the next copy into it
    }
  }

  // Rows' sums over the quad, then the output (normalised, or the split's partial state).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st[h].l += __shfl_xor_sync(kFullMask, st[h].l, 1);
    st[h].l += __shfl_xor_sync(kFullMask, st[h].l, 2);
  }
  if (!q_ready) cp_async_wait<0>();  // no visible tile: Q was never waited for
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (rows[h] >= R) continue;
    const RowDest rd = dest(rows[h]);
    const float inv_l = st[h].inv_l();
#pragma unroll
    for (int n = 0; n < kDB; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) store_value<T>(p, w, split, rd, n * 8 + 2 * t + e, o[n][2 * h + e], inv_l);
    }
    if (t == 0) store_stats(p, w, split, rd, st[h]);
  }
}

// Launches attention_tc_kernel<T, D, KV> for the planned work. kind: bf16 or fp16; D: a tc_head_dim; KV: void
// for a cache of T (attention_tc.cu), KvCode<F> for codes, KiviTc<bits> for KIVI. Each .cu compiles apart from the
// other kernels, in parallel.
template <typename KV>
void launch_tc_instance(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                        cudaStream_t stream) {
  dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kKivi = kKiviBits<KV>;
    using K = std::conditional_t<kIsKvCode<KV> || kKivi, KV, T>;
    if constexpr (!std::is_same_v<T, float>) {  // the planner never picks tensor cores for fp32
      with_head_dim(p.D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        if constexpr (kD * kKivi % 128 == 0) {  // KIVI: whole 16-byte chunks of codes (the planner checks)
          auto* kernel = &attention_tc_kernel<T, kD, K>;
          constexpr int64_t kSmem = TcTile < kD, kIsKvCode<K> || kKivi > ::kBytes;
          allow_dynamic_smem(kernel, kSmem);
          launch_kernel("attention_tc", kernel, grid, dim3(kTcThreads), static_cast<size_t>(kSmem), stream, p, w);
        }
      });
    }
  });
}

void launch_attention_tc(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                         cudaStream_t stream);
// Over codes: attention_tc.cu picks the format; the instances of each are compiled in their own file
// (attention_tc_<format>.cu), in parallel.
void launch_attention_tc_quantized(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                   cudaStream_t stream);
void launch_attention_tc_int8(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                              cudaStream_t stream);
void launch_attention_tc_fp8_e4m3(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                  cudaStream_t stream);
void launch_attention_tc_fp8_e5m2(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                  cudaStream_t stream);
void launch_attention_tc_kivi4(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                               cudaStream_t stream);
void launch_attention_tc_kivi2(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                               cudaStream_t stream);

}  // namespace fastar::cuda
