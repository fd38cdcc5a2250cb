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

// Element e of a 16-byte vector of T, as float.
template <typename T>
__device__ __forceinline__ float vector_element(const uint4& v, int e) {
  T x[16 / sizeof(T)];
  memcpy(static_cast<void*>(x), &v, 16);
  return to_float(x[e]);
}

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

__device__ __forceinline__ float warp_max(float v) {
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Sum over the block of one value per thread; every thread gets it. s_warp holds kWarps values.
template <int kWarps>
__device__ __forceinline__ uint64_t block_sum(uint64_t v, unsigned long long* s_warp) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;
  __syncthreads();
  uint64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += s_warp[w];
  __syncthreads();  // s_warp is free again
  return total;
}

// The contiguous segment of a row of V tokens that warp w of kWarps owns in a block-wide inverse-CDF search
// (whole multiples of 32, so a prefix over warps is a prefix over tokens).
template <int kWarps>
__device__ __forceinline__ void warp_segment(int64_t V, int w, int64_t* begin, int64_t* end) {
  const int64_t seg = ((V + kWarps - 1) / kWarps + 31) / 32 * 32;
  *begin = w * seg;
  *end = *begin + seg < V ? *begin + seg : V;
}

// Inverse CDF inside one warp's segment [begin, end), 32 tokens at a time: the first token whose inclusive
// fixed-point prefix sum of weight(t) exceeds `remaining` (below the segment's sum). Every lane returns it.
template <typename Weight>
__device__ __forceinline__ int64_t warp_find_token(int64_t begin, int64_t end, uint64_t remaining, int lane,
                                                   Weight weight) {
  for (int64_t base = begin; base < end; base += 32) {  // warp-uniform trip count
    const int64_t t = base + lane;
    const uint64_t incl = warp_inclusive_scan(t < end ? weight(t) : 0, lane);
    const uint64_t chunk = __shfl_sync(kFullMask, incl, 31);
    if (remaining < chunk) return base + __ffs(__ballot_sync(kFullMask, incl > remaining)) - 1;
    remaining -= chunk;
  }
  return end - 1;  // unreachable when remaining is below the segment's sum
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
