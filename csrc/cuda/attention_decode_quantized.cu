// Launcher of the decode kernel (attention_decode.cuh) over int8 / fp8 caches: its own file so that its instances
// (q dtype x head dim x format) compile in parallel with the others.
#include "cuda/attention_decode.cuh"

namespace fastar::cuda {

void launch_attention_decode_quantized(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                       cudaStream_t stream) {
  with_kv_format(p.kv_format,
                 [&](auto f) { launch_decode_instance<KvCode<decltype(f)::value>>(p, kind, w, grid, stream); });
}

}  // namespace fastar::cuda
