#include "cuda/launchers.h"
#include "cuda/speculative_sample.cuh"

namespace fastar {

void launch_speculative_sample(const ChainAcceptParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("speculative_sample", &cuda::speculative_sample_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm);
  });
}

}  // namespace fastar
