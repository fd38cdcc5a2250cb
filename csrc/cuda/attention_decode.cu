// Launcher of the 16-byte-load decode kernel (attention_decode.cuh) over 16-bit and fp32 caches, called by
// launch_attention (attention.cu).
#include "cuda/attention_decode.cuh"

namespace fastar::cuda {

void launch_attention_decode(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                             cudaStream_t stream) {
  launch_decode_instance<void>(p, kind, w, grid, stream);
}

}  // namespace fastar::cuda
