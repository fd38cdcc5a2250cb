// sm_80 building blocks of tensor-core kernels, one spelling for both builds: inline PTX under nvcc, the SIMT
// emulator's gates and queues under g++ (simt.h).
//   * mma_m16n8k16_{bf16,f16}(d, a, b, c): mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{..}.f32, d = a*b + c.
//     Fragments (g = lane >> 2, t = lane & 3; the low half of a .b32 holds the lower-indexed element):
//       a: 4 x .b32 = a0..a7 of A (16x16, m x k): a0,a1,a4,a5 in row g, a2,a3,a6,a7 in row g+8;
//          col 2t + (i & 1), +8 for a4..a7.
//       b: 2 x .b32 = b0..b3 of B (16x8, k x n): k = 2t + (i & 1), +8 for b2,b3; n = g.
//       c, d: 4 floats of C/D (16x8): c0,c1 in row g, c2,c3 in row g+8; col 2t + (i & 1).
//     Warp-collective: all 32 lanes, same call site, warp-uniform control flow.
//   * ldmatrix_x{1,2,4}[_trans](r, row): ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16. Lane 8j + i
//     gives the shared-memory address of row i (8 halves, 16-byte aligned) of matrix j; lane l receives in r[j]
//     the halves at row l >> 2, cols 2(l & 3) and 2(l & 3) + 1 of matrix j (_trans: of its transpose).
//     Warp-collective like mma.
//   * cp_async_{16,8,4}(dst_smem, src_global, src_bytes): cp.async.cg (16 bytes) / .ca (8, 4) global -> shared;
//     src_bytes < size zero-fills the rest; both addresses aligned to the size. A copy may land only at the
//     cp_async_wait<n>() (all committed groups but the n most recent) that covers the cp_async_commit() group it
//     was issued in; other threads see it after a __syncthreads that follows that wait.
// Every asm statement is also a compiler memory barrier, so shared-memory accesses stay on their side of it.
#pragma once

#include <cstdint>

#include "simt/simt.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "csrc/cuda/tensor_core.cuh: mma.sync m16n8k16 bf16, ldmatrix and cp.async need sm_80 or newer"
#endif

namespace fastar::cuda {

#ifdef __CUDACC__

#define FASTAR_MMA_M16N8K16(name, type)                                                                               \
  __device__ __forceinline__ void name(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {      \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                                               \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"                         \
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), \
                   "f"(c[3]));                                                                                        \
  }
FASTAR_MMA_M16N8K16(mma_m16n8k16_bf16, "bf16")
FASTAR_MMA_M16N8K16(mma_m16n8k16_f16, "f16")
#undef FASTAR_MMA_M16N8K16

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// operands: the destination registers, then the row address (nvcc takes no named asm operands).
#define FASTAR_LDMATRIX(name, shape, operands, ...)                                \
  __device__ __forceinline__ void name(uint32_t* r, const void* row) {             \
    asm volatile("ldmatrix.sync.aligned.m8n8." shape ".shared.b16 " operands ";\n" \
                 : __VA_ARGS__                                                     \
                 : "r"(smem_address(row))                                          \
                 : "memory");                                                      \
  }
FASTAR_LDMATRIX(ldmatrix_x1, "x1", "{%0}, [%1]", "=r"(r[0]))
FASTAR_LDMATRIX(ldmatrix_x2, "x2", "{%0, %1}, [%2]", "=r"(r[0]), "=r"(r[1]))
FASTAR_LDMATRIX(ldmatrix_x4, "x4", "{%0, %1, %2, %3}, [%4]", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]))
FASTAR_LDMATRIX(ldmatrix_x1_trans, "x1.trans", "{%0}, [%1]", "=r"(r[0]))
FASTAR_LDMATRIX(ldmatrix_x2_trans, "x2.trans", "{%0, %1}, [%2]", "=r"(r[0]), "=r"(r[1]))
FASTAR_LDMATRIX(ldmatrix_x4_trans, "x4.trans", "{%0, %1, %2, %3}, [%4]", "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]))
#undef FASTAR_LDMATRIX

__device__ __forceinline__ void cp_async_16(void* dst_smem, const void* src_global, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst_smem)), "l"(src_global),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_8(void* dst_smem, const void* src_global, int src_bytes = 8) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_address(dst_smem)), "l"(src_global),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst_smem, const void* src_global, int src_bytes = 4) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(dst_smem)), "l"(src_global),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else  // g++: the SIMT emulator. The trailing call site names the kernel's line in diagnoses.

inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                              std::source_location site = std::source_location::current()) {
  simt::mma_m16n8k16(true, d, a, b, c, site);
}
inline void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                             std::source_location site = std::source_location::current()) {
  simt::mma_m16n8k16(false, d, a, b, c, site);
}

#define FASTAR_SIMT_LDMATRIX(name, count, trans)                                                                \
  inline void name(uint32_t* r, const void* row, std::source_location site = std::source_location::current()) { \
    simt::ldmatrix(count, trans, r, row, site);                                                                 \
  }
FASTAR_SIMT_LDMATRIX(ldmatrix_x1, 1, false)
FASTAR_SIMT_LDMATRIX(ldmatrix_x2, 2, false)
FASTAR_SIMT_LDMATRIX(ldmatrix_x4, 4, false)
FASTAR_SIMT_LDMATRIX(ldmatrix_x1_trans, 1, true)
FASTAR_SIMT_LDMATRIX(ldmatrix_x2_trans, 2, true)
FASTAR_SIMT_LDMATRIX(ldmatrix_x4_trans, 4, true)
#undef FASTAR_SIMT_LDMATRIX

inline void cp_async_16(void* dst_smem, const void* src_global, int src_bytes = 16,
                        std::source_location site = std::source_location::current()) {
  simt::cp_async(dst_smem, src_global, 16, src_bytes, site);
}
inline void cp_async_8(void* dst_smem, const void* src_global, int src_bytes = 8,
                       std::source_location site = std::source_location::current()) {
  simt::cp_async(dst_smem, src_global, 8, src_bytes, site);
}
inline void cp_async_4(void* dst_smem, const void* src_global, int src_bytes = 4,
                       std::source_location site = std::source_location::current()) {
  simt::cp_async(dst_smem, src_global, 4, src_bytes, site);
}
inline void cp_async_commit() { simt::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N counts groups left in flight");
  simt::cp_async_wait(N);
}

#endif  // __CUDACC__

}  // namespace fastar::cuda
