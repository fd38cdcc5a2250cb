#include <stdexcept>

#include "cuda/launchers.h"
#include "cuda/speculative_sample.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

// One row to sample from per batch row, split so that B * chunks blocks fill the GPU.
cuda::RowSplit sample_split(const ChainAcceptParams& prm, FloatKind kind) {
  return cuda::split_rows(prm.B, prm.V, cuda::tile_elements(kind, kThreads), multiprocessors());
}

}  // namespace

int64_t speculative_sample_workspace(const ChainAcceptParams& prm, FloatKind kind) {
  const int64_t slots = prm.B * sample_split(prm, kind).chunks;
  return slots * static_cast<int64_t>(2 * sizeof(unsigned long long) + sizeof(int)) +
         prm.B * static_cast<int64_t>(2 * sizeof(int));
}

void launch_speculative_sample(const ChainAcceptParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::RowSplit split = sample_split(prm, kind);
  const int64_t slots = prm.B * split.chunks;
  if (slots > 0x7fffffff) throw std::invalid_argument("fastar.speculative_sample: too many rows for one launch");
  auto* sums = static_cast<unsigned long long*>(workspace);
  int* flags = reinterpret_cast<int*>(sums + 2 * slots);
  const cuda::SampleWorkspace w{sums,         sums + slots,   flags, flags + slots, flags + slots + prm.B,
                                split.chunks, split.chunk_len};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    if (prm.embeddings) {
      launch_kernel("gsd_partial", &cuda::gsd_partial_kernel<P, kThreads>, dim3(static_cast<unsigned>(slots)),
                    dim3(kThreads), 0, st, prm, w);
    } else {
      launch_kernel("speculative_sample_partial", &cuda::speculative_sample_partial_kernel<P, kThreads>,
                    dim3(static_cast<unsigned>(slots)), dim3(kThreads), 0, st, prm, w);
    }
    launch_kernel("speculative_sample_finish", &cuda::speculative_sample_finish_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, prm, w);
  });
}

}  // namespace fastar
