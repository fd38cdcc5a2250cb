// The tensor-core attention kernel's instances over KIVI int2 caches (attention_tc.cuh), in a file of their own.
#include "cuda/attention_tc.cuh"

namespace fastar::cuda {

void launch_attention_tc_kivi2(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                               cudaStream_t stream) {
  launch_tc_instance<KiviTc<2>>(p, kind, w, grid, stream);
}

}  // namespace fastar::cuda
