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

// A uint64 sum in shared memory as two uint32 words, so that adding to it is two native 32-bit atomics (a 64-bit
// shared atomicAdd compiles to a compare-and-swap spin loop): the low word wraps, and the add that wraps it
// carries one into the high word, so hi * 2^32 + lo is the exact sum whatever the order of the adds.
struct SplitSum {
  unsigned lo, hi;

  __device__ __forceinline__ void add(uint64_t w) {
    const unsigned low = static_cast<unsigned>(w);
    const unsigned old = atomicAdd(&lo, low);
    const unsigned carry = old + low < old ? 1u : 0u;
    const unsigned high = static_cast<unsigned>(w >> 32) + carry;
    if (high) atomicAdd(&hi, high);
  }
  __device__ __forceinline__ uint64_t value() const { return (static_cast<uint64_t>(hi) << 32) | lo; }
};

// Elements of P in one 16-byte load.
template <typename P>
inline constexpr int kVecOf = static_cast<int>(16 / sizeof(P));

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// One 16-byte global load (ld.global.v4) from a 16-byte aligned address; the emulator aborts on a misaligned one,
// where a GPU faults.
#ifdef __CUDACC__
__device__ __forceinline__ uint4 load_global16(const void* p) { return *static_cast<const uint4*>(p); }
#else
inline uint4 load_global16(const void* p, std::source_location site = std::source_location::current()) {
  return simt::load_global16(p, site);
}
#endif

// p, read from memory rather than passed to the kernel, as a global-memory address, so that nvcc emits global
// loads (LDG) through it rather than generic ones. The emulator has one address space.
template <typename T>
__device__ __forceinline__ T* global_ptr(T* p) {
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// x = row[t, t + kVecOf<P>) as floats, one 16-byte load when `aligned` (row 16-byte aligned, t a multiple of
// kVecOf<P>) and the span lies before `end`; elements at or past `end` are not read (x = 0). Returns how many
// are in range.
template <typename P>
__device__ __forceinline__ int load_span(const P* row, int64_t t, int64_t end, bool aligned, float (&x)[kVecOf<P>]) {
  constexpr int kVec = kVecOf<P>;
  const int m = end - t >= kVec ? kVec : (end > t ? static_cast<int>(end - t) : 0);
  if (aligned && m == kVec) {
    const uint4 v = load_global16(row + t);
    P y[kVec];
    memcpy(static_cast<void*>(y), &v, 16);
#pragma unroll
    for (int e = 0; e < kVec; ++e) x[e] = to_float(y[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) x[e] = e < m ? to_float(row[t + e]) : 0.0f;
  }
  return m;
}

// Block-wide exclusive prefix sum of one value per thread (in thread order); *total gets the block's sum.
// s_warp holds kWarps values.
template <int kWarps>
__device__ __forceinline__ uint64_t block_exclusive_scan(uint64_t v, unsigned long long* s_warp, uint64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint64_t incl = warp_inclusive_scan(v, lane);
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  uint64_t before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += s_warp[w];
    sum += s_warp[w];
  }
  __syncthreads();  // s_warp is free again
  *total = sum;
  return before + incl - v;
}

// A split of rows of V elements over blocks: chunks of chunk_len elements (a multiple of `tile`, the elements a
// block reads in one step), enough of them that rows * chunks blocks fill the GPU (multiprocessors(), launchers.h).
struct RowSplit {
  int64_t chunks, chunk_len;
};
inline RowSplit split_rows(int64_t rows, int64_t V, int64_t tile, int sms) {
  const int64_t tiles = (V + tile - 1) / tile;
  const int64_t target = 4 * static_cast<int64_t>(sms);
  int64_t chunks = rows < target ? (target + rows - 1) / rows : 1;
  if (chunks > tiles) chunks = tiles;
  if (chunks < 1) chunks = 1;
  const int64_t chunk_len = (tiles + chunks - 1) / chunks * tile;
  return RowSplit{(V + chunk_len - 1) / chunk_len, chunk_len};
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

// Elements a block of `threads` threads reads from rows of kind in one step of 16-byte loads (split_rows' tile).
inline int64_t tile_elements(FloatKind kind, int threads) {
  int64_t tile = 0;
  dispatch_device_float(kind, [&](auto tag) { tile = threads * kVecOf<decltype(tag)>; });
  return tile;
}

}  // namespace fastar::cuda
