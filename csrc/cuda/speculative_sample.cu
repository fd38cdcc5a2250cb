#include "cuda/launchers.h"
#include "cuda/speculative_sample.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

}  // namespace

// The chunk sums of the row each batch row samples from, then per batch row its status and position.
int64_t speculative_sample_workspace(const ChainAcceptParams& prm, FloatKind kind) {
  return cuda::chunk_layout(prm.B, prm.V, kind, kThreads, "fastar.speculative_sample").bytes() +
         prm.B * static_cast<int64_t>(2 * sizeof(int));
}

void launch_speculative_sample(const ChainAcceptParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::ChunkLayout layout = cuda::chunk_layout(prm.B, prm.V, kind, kThreads, "fastar.speculative_sample");
  int* flags = reinterpret_cast<int*>(static_cast<char*>(workspace) + layout.bytes());
  const cuda::SampleWorkspace w{layout.at(workspace), flags, flags + prm.B};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    if (prm.embeddings) {
      launch_kernel("gsd_partial", &cuda::gsd_partial_kernel<P, kThreads>, dim3(static_cast<unsigned>(layout.slots)),
                    dim3(kThreads), 0, st, prm, w);
    } else {
      launch_kernel("speculative_sample_partial", &cuda::speculative_sample_partial_kernel<P, kThreads>,
                    dim3(static_cast<unsigned>(layout.slots)), dim3(kThreads), 0, st, prm, w);
    }
    launch_kernel("speculative_sample_finish", &cuda::speculative_sample_finish_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, prm, w);
  });
}

}  // namespace fastar
