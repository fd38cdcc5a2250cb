#include "cuda/launchers.h"
#include "cuda/typical_accept.cuh"

namespace fastar {

void launch_typical_accept(const TreeSampleParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("typical_accept", &cuda::typical_accept_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm);
  });
}

}  // namespace fastar
