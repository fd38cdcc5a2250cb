#include "cuda/compact_kv.cuh"
#include "cuda/launchers.h"

namespace fastar {

void launch_compact_kv(const CompactKvParams& prm, void* stream) {
  // The widest chunk that divides the row, both bases and every stride.
  const uint64_t bits =
      static_cast<uint64_t>(prm.row_bytes | prm.k_s0 | prm.k_s1 | prm.v_s0 | prm.v_s1 | prm.k_sl | prm.v_sl) |
      reinterpret_cast<uintptr_t>(prm.k) | reinterpret_cast<uintptr_t>(prm.v);
  int bytes = 16;
  while (bytes > 1 && (bits & static_cast<uint64_t>(bytes - 1))) bytes /= 2;
  const int64_t chunks = prm.row_bytes / bytes;
  constexpr int kThreads = 128;
  // At least one block per row, whose first thread writes the row's new length.
  const dim3 grid(static_cast<unsigned>((2 * prm.layers * chunks + kThreads - 1) / kThreads + (chunks == 0 ? 1 : 0)),
                  static_cast<unsigned>(prm.B));
  auto launch = [&](auto kernel) {
    launch_kernel("compact_kv", kernel, grid, dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm, chunks);
  };
  switch (bytes) {
    case 16:
      return launch(&cuda::compact_kv_kernel<16>);
    case 8:
      return launch(&cuda::compact_kv_kernel<8>);
    case 4:
      return launch(&cuda::compact_kv_kernel<4>);
    case 2:
      return launch(&cuda::compact_kv_kernel<2>);
    default:
      return launch(&cuda::compact_kv_kernel<1>);
  }
}

}  // namespace fastar
