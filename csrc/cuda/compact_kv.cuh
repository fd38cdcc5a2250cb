// CUDA kernel of fastar.compact_kv: thread (c, b) owns chunk c % chunks (kBytes bytes) of sequence b's rows in layer
// c / chunks / 2, in the K or the V cache, and moves it along the kept path in increasing position order. Since path[j]
// >= j (core/compact_kv.h) no position is read after it was written, and no two threads touch one byte.
#pragma once
#include <cstdint>

#include "core/compact_kv.h"
#include "cuda/common.cuh"

namespace fastar::cuda {

// A kBytes-byte vector: the widest load the caches' alignment allows.
template <int kBytes>
struct CompactChunk;
template <>
struct CompactChunk<16> {
  using type = uint4;
};
template <>
struct CompactChunk<8> {
  using type = uint2;
};
template <>
struct CompactChunk<4> {
  using type = uint32_t;
};
template <>
struct CompactChunk<2> {
  using type = uint16_t;
};
template <>
struct CompactChunk<1> {
  using type = uint8_t;
};

// Positions moved per batch of loads: the loads of a batch are issued before its stores (path[j] >= j keeps them
// independent), so kUnroll copies are in flight per thread.
constexpr int kCompactUnroll = 4;

template <int kBytes>
__global__ void compact_kv_kernel(CompactKvParams p, int64_t chunks) {
  using Chunk = typename CompactChunk<kBytes>::type;
  const int64_t b = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t keep;
  const int32_t status = compact_row_status(p, b, &keep);  // every thread of the row finds the same
  if (c == 0) p.new_seqlens[b] = compact_new_length(p, b, status, keep);
  if (c >= 2 * p.layers * chunks || status != accept::kOk) return;
  const int64_t layer = c / chunks / 2;
  const bool is_v = c / chunks % 2;
  uint8_t* base = is_v ? p.v + layer * p.v_sl : p.k + layer * p.k_sl;
  const int64_t s0 = is_v ? p.v_s0 : p.k_s0, s1 = is_v ? p.v_s1 : p.k_s1;
  const int64_t offset = c % chunks * kBytes, start = p.seqlens[b];
  const int32_t* path = p.path + b * p.W;
  for (int64_t j0 = 0; j0 < keep; j0 += kCompactUnroll) {
    Chunk v[kCompactUnroll];
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      const int64_t j = j0 + u;
      if (j < keep && path[j] != j)
        v[u] = *reinterpret_cast<const Chunk*>(compact_slot(p, base, s0, s1, b, start + path[j]) + offset);
    }
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      const int64_t j = j0 + u;
      if (j < keep && path[j] != j)
        *reinterpret_cast<Chunk*>(compact_slot(p, base, s0, s1, b, start + j) + offset) = v[u];
    }
  }
}

}  // namespace fastar::cuda
