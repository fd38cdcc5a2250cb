// One-byte K/V codes (docs/quantized_kvcache.md) as the attention kernels read them: exact conversions of the
// codes of a KvCode<F> instance (core/kv_quant.h) to float. int8 and both fp8 formats convert exactly to
// float, bf16 and fp16, so a kernel may feed converted codes to the tensor cores unchanged.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/kv_quant.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

// Two e4m3 codes (the low byte first) as floats: sm_89+'s cvt.rn.f16x2.e4m3x2 (exact: every e4m3 value is an fp16
// value), elsewhere core/kv_quant.h's bit arithmetic.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<unsigned short>(two)));
  __half2 pair;
  memcpy(&pair, &h2, 4);
  return __half22float2(pair);
#else
  return float2{fp8_to_float<KvFormat::kFp8E4M3>(static_cast<uint8_t>(two)),
                fp8_to_float<KvFormat::kFp8E4M3>(static_cast<uint8_t>(two >> 8))};
#endif
}

// The value of code c (its low byte) of format F, NaN and e5m2's infinities included. e5m2 is the top byte of an
// fp16.
template <KvFormat F>
__device__ __forceinline__ float code_to_float(uint32_t c) {
  if constexpr (F == KvFormat::kInt8) {
    return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(c)));
  } else if constexpr (F == KvFormat::kFp8E5M2) {
    __half_raw h;
    h.x = static_cast<unsigned short>((c & 0xffu) << 8);
    return __half2float(__half(h));
  } else {
    return e4m3x2_to_float2(c & 0xffu).x;
  }
}

// The 16 codes of a 16-byte load as floats, in memory order (e4m3: a conversion per pair).
template <KvFormat F>
__device__ __forceinline__ void codes_to_float(const uint4& raw, float* x) {
  uint32_t w[4];
  memcpy(w, &raw, 16);
  if constexpr (F == KvFormat::kFp8E4M3) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 f = e4m3x2_to_float2(w[i / 2] >> (16 * (i % 2)));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = code_to_float<F>(w[i / 4] >> (8 * (i % 4)));
  }
}

}  // namespace fastar::cuda
