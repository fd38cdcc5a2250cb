// The tensor-core attention kernel's instances over fp8_e5m2 codes (attention_tc.cuh), in a file of their own.
#include "cuda/attention_tc.cuh"

namespace fastar::cuda {

void launch_attention_tc_fp8_e5m2(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                  cudaStream_t stream) {
  launch_tc_instance<KvCode<KvFormat::kFp8E5M2>>(p, kind, w, grid, stream);
}

}  // namespace fastar::cuda
