// Device helpers shared by fastar's CUDA kernels. Portable CUDA only (the SIMT emulator runs it).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/acceptance.h"
#include "simt/simt.h"

namespace fastar::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

__device__ __forceinline__ uint64_t warp_inclusive_scan(uint64_t v, int lane) {
  for (int d = 1; d < 32; d <<= 1) {
    const uint64_t up = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

// Calls f(T{}) with T the device element type of kind.
template <typename F>
void dispatch_device_float(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kFloat32:
      return f(float{});
    case FloatKind::kFloat16:
      return f(__half{});
    case FloatKind::kBFloat16:
      return f(__nv_bfloat16{});
  }
}

}  // namespace fastar::cuda
