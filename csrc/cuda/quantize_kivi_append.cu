#include "cuda/launchers.h"
#include "cuda/quantize_kivi_append.cuh"

namespace fastar {

void launch_quantize_kivi_append(const KiviAppendParams& prm, FloatKind kind, void* stream) {
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    const bool int4 = prm.bits == 4;
    const auto s = static_cast<cudaStream_t>(stream);
    if (prm.Nk > 0) {
      const dim3 blocks(static_cast<unsigned>(prm.Nk / prm.G), static_cast<unsigned>(prm.Hkv));
      launch_kernel("quantize_kivi_keys",
                    int4 ? &cuda::quantize_kivi_keys_kernel<T, 4> : &cuda::quantize_kivi_keys_kernel<T, 2>, blocks,
                    dim3(static_cast<unsigned>(prm.D * prm.bits / 8)), 0, s, prm);
    }
    const int64_t threads = prm.Nv * (prm.D / prm.G);
    if (threads > 0 && prm.Hkv > 0)
      launch_kernel("quantize_kivi_values",
                    int4 ? &cuda::quantize_kivi_values_kernel<T, 4> : &cuda::quantize_kivi_values_kernel<T, 2>,
                    dim3(static_cast<unsigned>((threads + 127) / 128), static_cast<unsigned>(prm.Hkv)), dim3(128), 0, s,
                    prm);
  });
}

}  // namespace fastar
