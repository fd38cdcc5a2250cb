// CUDA kernel of fastar.quantize_kv_append: one warp per (token, kv head) quantizes its K row, then its V row
// (core/kv_quant.h). Memory-bound: it reads 2 * D input elements and writes 2 * D code bytes (plus two scales)
// per warp, so on an H100 (3.35 TB/s) a decode step's append of 8 x 8 heads x 128 is far below a microsecond of
// traffic and launch latency dominates. A slot outside [0, num_slots) is skipped; a row holding NaN or Inf gets
// a NaN scale (int8 and per-token fp8) or NaN codes (fp8 at a fixed scale), so only attention to that key sees it.
#pragma once
#include "core/kv_quant.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

template <KvFormat F, typename T>
__device__ __forceinline__ void quantize_row(const T* row, int64_t D, float* scale_out, const float* fixed_scale,
                                             uint8_t* codes, int lane) {
  float s;
  if (scale_out) {
    float amax = 0.0f;
    bool finite = true;
    for (int64_t d = lane; d < D; d += 32) {
      const float x = to_float(row[d]);
      finite = finite && fabsf(x) <= 3.4e38f;
      amax = fmaxf(amax, fabsf(x));
    }
    amax = warp_max(amax);
    finite = __all_sync(0xffffffffu, finite);
    s = finite ? amax / kv_code_max(F) : __int_as_float(0x7fc00000);
    if (lane == 0) *scale_out = s;
  } else {
    s = *fixed_scale;
  }
  for (int64_t d = lane; d < D; d += 32) codes[d] = kv_code<F>(to_float(row[d]), s);
}

template <typename T, KvFormat F>
__global__ void __launch_bounds__(128) quantize_kv_append_kernel(QuantizeKvParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (i >= p.N * p.Hkv) return;
  const int64_t n = i / p.Hkv, h = i % p.Hkv, slot = p.slots[n];
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t at = slot * p.Hkv + h;
  const int64_t fixed = p.scale_per_head ? h : 0;
  quantize_row<F>(static_cast<const T*>(p.key) + n * p.k_sn + h * p.k_sh, p.D,
                  p.per_token_scale ? p.k_scale + at : nullptr, p.k_scale + fixed, p.k_cache + at * p.D, lane);
  quantize_row<F>(static_cast<const T*>(p.value) + n * p.v_sn + h * p.v_sh, p.D,
                  p.per_token_scale ? p.v_scale + at : nullptr, p.v_scale + fixed, p.v_cache + at * p.D, lane);
}

}  // namespace fastar::cuda
