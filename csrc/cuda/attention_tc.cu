// Launchers of the tensor-core attention kernel (attention_tc.cuh) over 16-bit caches, and the choice of format
// over codes; called by launch_attention (attention.cu).
#include "cuda/attention_tc.cuh"

namespace fastar::cuda {

void launch_attention_tc(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                         cudaStream_t stream) {
  launch_tc_instance<void>(p, kind, w, grid, stream);
}

void launch_attention_tc_quantized(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                   cudaStream_t stream) {
  if (p.kivi_bits)
    return (p.kivi_bits == 4 ? launch_attention_tc_kivi4 : launch_attention_tc_kivi2)(p, kind, w, grid, stream);
  switch (p.kv_format) {
    case KvFormat::kInt8:
      return launch_attention_tc_int8(p, kind, w, grid, stream);
    case KvFormat::kFp8E4M3:
      return launch_attention_tc_fp8_e4m3(p, kind, w, grid, stream);
    case KvFormat::kFp8E5M2:
      return launch_attention_tc_fp8_e5m2(p, kind, w, grid, stream);
  }
}

}  // namespace fastar::cuda
