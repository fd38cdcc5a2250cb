#include "cuda/launchers.h"
#include "cuda/spectr_accept.cuh"

namespace fastar {

void launch_spectr_accept(const SpectrParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("spectr_accept", &cuda::spectr_accept_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm);
  });
}

}  // namespace fastar
