#include "cuda/greedy_verify.cuh"
#include "cuda/launchers.h"

namespace fastar {

void launch_greedy_verify(const GreedyVerifyParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("greedy_verify", &cuda::greedy_verify_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm);
  });
}

}  // namespace fastar
