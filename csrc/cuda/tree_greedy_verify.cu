#include "cuda/launchers.h"
#include "cuda/tree_greedy_verify.cuh"

namespace fastar {

void launch_tree_greedy_verify(const TreeSampleParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("tree_greedy_verify", &cuda::tree_greedy_verify_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), prm);
  });
}

}  // namespace fastar
