// Launcher of the 16-byte-load decode kernel (attention_decode.cuh), called by launch_attention (attention.cu).
#include "cuda/attention_decode.cuh"

namespace fastar::cuda {

void launch_attention_decode(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                             cudaStream_t stream) {
  dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    with_head_dim(p.D, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if constexpr (!std::is_same_v<T, float> || kD <= 128) {  // the planner keeps fp32 D = 256 off it
        auto* kernel = &attention_decode_kernel<T, kD>;
        constexpr int64_t kSmem = DecodeShape<T, kD>::kBytes;
        allow_dynamic_smem(kernel, kSmem);
        launch_kernel("attention_vec_decode", kernel, grid, dim3(kDecodeThreads), static_cast<size_t>(kSmem), stream, p,
                      w);
      }
    });
  });
}

}  // namespace fastar::cuda
