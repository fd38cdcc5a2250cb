// Test kernels of the tensor-core wrappers (csrc/cuda/tensor_core.cuh), portable CUDA: the SIMT self-tests
// (selftest.cpp) run them on the CPU, and tests/test_simt_mma.py compiles them with nvcc for sm_80 / sm_90.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/tensor_core.cuh"
#include "simt/simt.h"

namespace fastar::cuda::selftest {

// One mma per block of 32 threads; per block, lane l's fragments are a[4], b[2], c[4] at index l.
__global__ void mma_fragments_kernel(bool bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const unsigned i = blockIdx.x * 32 + threadIdx.x;
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int j = 0; j < 4; ++j) ra[j] = a[4 * i + j];
  for (int j = 0; j < 2; ++j) rb[j] = b[2 * i + j];
  for (int j = 0; j < 4; ++j) rc[j] = c[4 * i + j];
  if (bf16)
    mma_m16n8k16_bf16(rd, ra, rb, rc);
  else
    mma_m16n8k16_f16(rd, ra, rb, rc);
  for (int j = 0; j < 4; ++j) d[4 * i + j] = rd[j];
}

// Copies `halves` 16-bit words into dynamic shared memory, then lane l runs ldmatrix on the row at row_offsets[l].
__global__ void ldmatrix_kernel(int count, bool trans, const uint16_t* image, int halves, const int* row_offsets,
                                uint32_t* out) {
  FASTAR_DYNAMIC_SMEM(uint16_t, smem);
  for (int i = threadIdx.x; i < halves; i += blockDim.x) smem[i] = image[i];
  __syncthreads();
  const uint16_t* row = smem + row_offsets[threadIdx.x];
  uint32_t r[4] = {0, 0, 0, 0};
  if (count == 1 && !trans) ldmatrix_x1(r, row);
  if (count == 2 && !trans) ldmatrix_x2(r, row);
  if (count == 4 && !trans) ldmatrix_x4(r, row);
  if (count == 1 && trans) ldmatrix_x1_trans(r, row);
  if (count == 2 && trans) ldmatrix_x2_trans(r, row);
  if (count == 4 && trans) ldmatrix_x4_trans(r, row);
  for (int j = 0; j < count; ++j) out[threadIdx.x * count + j] = r[j];
}

// One warp: D = A * B + C for row-major A (16x16) and B given row-major (16x8, k x n) or as its transpose (8x16,
// n x k), as a tensor-core kernel does it: 16-byte cp.async into shared memory, ldmatrix (.trans for row-major B),
// mma, D stored by its fragment layout. skip_wait plants the missing cp.async.wait_group.
template <typename T>
__global__ void mma_tile_kernel(const T* a, const T* b, bool b_row_major, const float* c, float* d, bool skip_wait) {
  FASTAR_DYNAMIC_SMEM(T, sa);
  T* sb = sa + 16 * 16;
  const int lane = threadIdx.x;
  cp_async_16(sa + 8 * lane, a + 8 * lane);
  if (lane < 16) cp_async_16(sb + 8 * lane, b + 8 * lane);
  cp_async_commit();
  if (!skip_wait) cp_async_wait<0>();
  __syncthreads();
  uint32_t ra[4], rb[2];
  // x4: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
  ldmatrix_x4(ra, sa + 16 * (lane % 16) + 8 * (lane / 16));
  if (b_row_major)
    ldmatrix_x2_trans(rb, sb + 8 * (lane % 16));  // matrix j = rows k of 8j..8j+7
  else
    ldmatrix_x2(rb, sb + 16 * (lane % 8) + 8 * (lane / 8 % 2));  // matrix j = cols k of 8j..8j+7
  const int g = lane >> 2, t = lane & 3;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[8 * (g + 8 * (i >> 1)) + 2 * t + (i & 1)];
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    mma_m16n8k16_bf16(acc, ra, rb, acc);
  else
    mma_m16n8k16_f16(acc, ra, rb, acc);
  for (int i = 0; i < 4; ++i) d[8 * (g + 8 * (i >> 1)) + 2 * t + (i & 1)] = acc[i];
}

// Each thread stages words 8t..8t+7 of src into its shared slots through cp.async groups and records what it
// reads after each step: out[4][256] (stage, word).
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* out) {
  __shared__ __align__(16) uint32_t s[256];
  const unsigned t = threadIdx.x;
  uint32_t* mine = s + 8 * t;
  const uint32_t* g = src + 8 * t;
  for (int i = 0; i < 8; ++i) mine[i] = 0xA0000000u + 8 * t + i;
  cp_async_16(mine, g);  // group 0
  cp_async_commit();
  cp_async_8(mine + 4, g + 4, 5);  // group 1: 5 bytes read, 3 zero-filled
  cp_async_4(mine + 6, g + 6, 0);  // group 1: all zero-filled
  cp_async_commit();
  cp_async_4(mine + 7, g + 7);  // not committed: no wait_group covers it
  for (int i = 0; i < 8; ++i) out[0 * 256 + 8 * t + i] = mine[i];
  cp_async_wait<1>();
  for (int i = 0; i < 8; ++i) out[1 * 256 + 8 * t + i] = mine[i];
  cp_async_wait<0>();
  for (int i = 0; i < 8; ++i) out[2 * 256 + 8 * t + i] = mine[i];
  cp_async_commit();
  cp_async_wait<0>();
  for (int i = 0; i < 8; ++i) out[3 * 256 + 8 * t + i] = mine[i];
}

}  // namespace fastar::cuda::selftest
