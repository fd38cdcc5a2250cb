// CUDA kernel of fastar.quantize_kv_append: one warp per (token, kv head) quantizes its K row, then its V row
// (core/kv_quant.h). Memory-bound: per row it reads D input elements and writes D code bytes and a scale. With
// 16-byte aligned rows (kV = 16 / sizeof(T), the launcher checks) each lane reads a 16-byte chunk per step
// (D = 128 bf16: 16 lanes, one load each) and writes its kV codes in one store; otherwise (kV = 1) lanes take
// single elements. Either way the warp's loads are coalesced. On an H100 (3.35 TB/s) a decode step's append of
// 8 x 8 heads x 128 is ~0.5 MB: launch latency dominates. A slot outside [0, num_slots) is skipped; a row holding
// NaN or Inf gets a NaN scale (int8 and per-token fp8) or NaN codes (fp8 at a fixed scale), so only attention to
// that key sees it.
#pragma once
#include "core/kv_quant.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

// Elements [c * kV, (c + 1) * kV) of row, as floats.
template <int kV, typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t c, float (&x)[kV]) {
  if constexpr (kV == 1) {
    x[0] = to_float(row[c]);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c * kV);
    for (int e = 0; e < kV; ++e) x[e] = vector_element<T>(raw, e);
  }
}

// kV codes at codes + c * kV in one store (kV * c bytes in: 4- or 8-byte aligned when kV is 4 or 8).
template <int kV>
__device__ __forceinline__ void store_chunk(uint8_t* codes, int64_t c, const uint8_t (&b)[kV]) {
  if constexpr (kV == 1) {
    codes[c] = b[0];
  } else if constexpr (kV == 4) {
    *reinterpret_cast<uint32_t*>(codes + c * 4) = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint32_t>(b[3]) << 24;
  } else {
    static_assert(kV == 8, "16-byte chunks of 2- or 4-byte elements");
    uint2 w;
    w.x = b[0] | b[1] << 8 | b[2] << 16 | static_cast<uint32_t>(b[3]) << 24;
    w.y = b[4] | b[5] << 8 | b[6] << 16 | static_cast<uint32_t>(b[7]) << 24;
    *reinterpret_cast<uint2*>(codes + c * 8) = w;
  }
}

template <KvFormat F, int kV, typename T>
__device__ __forceinline__ void quantize_row(const T* row, int64_t D, float* scale_out, const float* fixed_scale,
                                             uint8_t* codes, int lane) {
  const int64_t chunks = D / kV;
  float x[kV];
  float s;
  if (scale_out) {
    float amax = 0.0f;
    bool finite = true;
    for (int64_t c = lane; c < chunks; c += 32) {
      load_chunk<kV>(row, c, x);
      for (int e = 0; e < kV; ++e) {
        finite = finite && fabsf(x[e]) <= 3.4e38f;
        amax = fmaxf(amax, fabsf(x[e]));
      }
    }
    amax = warp_max(amax);
    finite = __all_sync(0xffffffffu, finite);
    s = finite ? amax / kv_code_max(F) : __int_as_float(0x7fc00000);
    if (lane == 0) *scale_out = s;
  } else {
    s = *fixed_scale;
  }
  for (int64_t c = lane; c < chunks; c += 32) {
    load_chunk<kV>(row, c, x);  // an L1 hit: the first loop read it
    uint8_t b[kV];
    for (int e = 0; e < kV; ++e) b[e] = kv_code<F>(x[e], s);
    store_chunk<kV>(codes, c, b);
  }
}

template <typename T, KvFormat F, int kV>
__global__ void __launch_bounds__(128) quantize_kv_append_kernel(QuantizeKvParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (i >= p.N * p.Hkv) return;
  const int64_t n = i / p.Hkv, h = i % p.Hkv, slot = p.slots[n];
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t at = slot * p.Hkv + h;
  const int64_t fixed = p.scale_per_head ? h : 0;
  quantize_row<F, kV>(static_cast<const T*>(p.key) + n * p.k_sn + h * p.k_sh, p.D,
                      p.per_token_scale ? p.k_scale + at : nullptr, p.k_scale + fixed, p.k_cache + at * p.D, lane);
  quantize_row<F, kV>(static_cast<const T*>(p.value) + n * p.v_sn + h * p.v_sh, p.D,
                      p.per_token_scale ? p.v_scale + at : nullptr, p.v_scale + fixed, p.v_cache + at * p.D, lane);
}

// Whether every K / V row starts 16-byte aligned and every cache row kV-byte aligned (the chunked kernel).
template <typename T>
inline bool rows_in_chunks(const QuantizeKvParams& p) {
  constexpr int64_t kV = 16 / sizeof(T);
  const auto aligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  return p.D % kV == 0 && (p.k_sn | p.k_sh | p.v_sn | p.v_sh) % kV == 0 && aligned(p.key, 16) && aligned(p.value, 16) &&
         aligned(p.k_cache, kV) && aligned(p.v_cache, kV);
}

}  // namespace fastar::cuda
