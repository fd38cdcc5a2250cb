// Launcher of the tensor-core attention kernel (attention_tc.cuh) over 16-bit caches, called by launch_attention
// (attention.cu).
#include "cuda/attention_tc.cuh"

namespace fastar::cuda {

void launch_attention_tc(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                         cudaStream_t stream) {
  launch_tc_instance<void>(p, kind, w, grid, stream);
}

}  // namespace fastar::cuda
