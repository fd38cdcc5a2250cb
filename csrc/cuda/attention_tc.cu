// Launcher of the tensor-core attention kernel (attention_tc.cuh), called by launch_attention (attention.cu).
#include "cuda/attention_tc.cuh"

namespace fastar::cuda {

void launch_attention_tc(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                         cudaStream_t stream) {
  dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {  // the planner never picks tensor cores for fp32
      with_head_dim(p.D, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        auto* kernel = &attention_tc_kernel<T, kD>;
        constexpr int64_t kSmem = TcTile<kD>::kBytes;
        allow_dynamic_smem(kernel, kSmem);
        launch_kernel("attention_tc", kernel, grid, dim3(kTcThreads), static_cast<size_t>(kSmem), stream, p, w);
      });
    }
  });
}

}  // namespace fastar::cuda
