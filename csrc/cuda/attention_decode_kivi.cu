// Launcher of the KIVI decode kernel (attention_decode_kivi.cuh): its own file so that its instances (q dtype x head
// dim x bits) compile in parallel with the others.
#include "cuda/attention_decode_kivi.cuh"

namespace fastar::cuda {

void launch_attention_decode_kivi(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                  cudaStream_t stream) {
  dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto d, auto bits) {
      constexpr int kD = decltype(d)::value, kBits = decltype(bits)::value;
      auto* kernel = &attention_kivi_decode_kernel<T, kD, kBits>;
      constexpr int64_t kSmem = KiviDecodeShape<T, kD, kBits>::kBytes;
      allow_dynamic_smem(kernel, kSmem);
      launch_kernel("attention_kivi_decode", kernel, grid, dim3(kAttnThreads), static_cast<size_t>(kSmem), stream, p,
                    w);
    };
    auto with_bits = [&](auto d) {
      if (p.kivi_bits == 4) return run(d, std::integral_constant<int, 4>{});
      run(d, std::integral_constant<int, 2>{});
    };
    if (p.D == 64) return with_bits(std::integral_constant<int, 64>{});
    if (p.D == 128) return with_bits(std::integral_constant<int, 128>{});
    with_bits(std::integral_constant<int, 256>{});  // kivi_decode_supported: D is 64, 128 or 256
  });
}

}  // namespace fastar::cuda
