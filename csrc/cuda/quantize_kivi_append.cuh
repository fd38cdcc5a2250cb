// CUDA kernels of fastar.quantize_kivi_append (core/kivi_quant.h). Keys: one block per group of G tokens and kv
// head (grid x, y), one thread per byte of a packed row (8 / bits channels): it takes its channels' min and max over
// the G tokens, then writes one code byte per token; adjacent threads read adjacent elements. Values: one thread per
// (token, group of G channels) and a grid row per kv head; a group's codes fill whole bytes (G * bits % 8 == 0).
// Memory-bound and small: a decode step appends one token's values and, every G steps, one group of keys (at
// D = 128, int4: 64 B of codes and 16 B of scales per token and head), so on an H100 launch latency dominates.
// An id outside its range is skipped; NaN, Inf or a value past float16's range gives a NaN scale to its channel
// of the key group (so the group's G keys of that head read NaN) or to its token's value channel group, so only
// attention to those keys sees it.
#pragma once
#include "core/kivi_quant.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

constexpr uint16_t kHalfNaN = 0x7e00;

__device__ __forceinline__ bool kivi_storable(float x) { return fabsf(x) <= 65504.0f; }

// kBits is a template argument so that the per-channel arrays below stay in registers.
template <typename T, int kBits>
__global__ void quantize_kivi_keys_kernel(KiviAppendParams p) {
  constexpr int bits = kBits, per_byte = 8 / kBits;
  const int64_t g = blockIdx.x, h = blockIdx.y, group = p.key_groups[g];
  const int64_t t = threadIdx.x, bytes = p.D * bits / 8;
  if (group < 0 || group >= p.num_slots / p.G || t >= bytes) return;
  const T* rows = static_cast<const T*>(p.key) + g * p.G * p.k_sn + h * p.k_sh + t * per_byte;
  float lo[per_byte], hi[per_byte];
  bool ok[per_byte];
#pragma unroll
  for (int j = 0; j < per_byte; ++j) lo[j] = INFINITY, hi[j] = -INFINITY, ok[j] = true;
  for (int64_t i = 0; i < p.G; ++i)
#pragma unroll
    for (int j = 0; j < per_byte; ++j) {
      const float x = to_float(rows[i * p.k_sn + j]);
      ok[j] = ok[j] && kivi_storable(x);
      lo[j] = fminf(lo[j], x);
      hi[j] = fmaxf(hi[j], x);
    }
  KiviRange r[per_byte];
#pragma unroll
  for (int j = 0; j < per_byte; ++j) {
    r[j] = kivi_range(lo[j], hi[j], bits);
    const int64_t meta = (group * p.Hkv + h) * p.D + t * per_byte + j;
    p.k_scale[meta] = ok[j] ? r[j].scale_h : kHalfNaN;
    p.k_zero[meta] = r[j].zero_h;
  }
  for (int64_t i = 0; i < p.G; ++i) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < per_byte; ++j) byte |= kivi_code(to_float(rows[i * p.k_sn + j]), r[j], bits) << (j * bits);
    p.k_codes[((group * p.G + i) * p.Hkv + h) * bytes + t] = static_cast<uint8_t>(byte);
  }
}

template <typename T, int kBits>
__global__ void __launch_bounds__(128) quantize_kivi_values_kernel(KiviAppendParams p) {
  constexpr int bits = kBits, per_byte = 8 / kBits;
  // 32-bit index math (the launcher keeps Nv * D / G below 2^31): a 64-bit division is a called subroutine.
  const uint32_t groups = static_cast<uint32_t>(p.D / p.G), i = blockIdx.x * 128 + threadIdx.x;
  if (i >= static_cast<uint32_t>(p.Nv) * groups) return;
  const int64_t c = i % groups, n = i / groups, h = blockIdx.y, slot = p.value_slots[n];
  if (slot < 0 || slot >= p.num_slots) return;
  const T* x = static_cast<const T*>(p.value) + n * p.v_sn + h * p.v_sh + c * p.G;
  float lo = INFINITY, hi = -INFINITY;
  bool ok = true;
  for (int64_t d = 0; d < p.G; ++d) {
    const float v = to_float(x[d]);
    ok = ok && kivi_storable(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  const KiviRange r = kivi_range(lo, hi, bits);
  p.v_scale[(slot * p.Hkv + h) * groups + c] = ok ? r.scale_h : kHalfNaN;
  p.v_zero[(slot * p.Hkv + h) * groups + c] = r.zero_h;
  uint8_t* out = p.v_codes + (slot * p.Hkv + h) * (p.D * bits / 8) + c * p.G * bits / 8;
  for (int64_t b = 0; b < p.G / per_byte; ++b) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < per_byte; ++j) byte |= kivi_code(to_float(x[b * per_byte + j]), r, bits) << (j * bits);
    out[b] = static_cast<uint8_t>(byte);
  }
}

}  // namespace fastar::cuda
