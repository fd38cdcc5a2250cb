#include "cuda/launchers.h"
#include "cuda/quantize_kv_append.cuh"

namespace fastar {

void launch_quantize_kv_append(const QuantizeKvParams& prm, FloatKind kind, void* stream) {
  const int64_t blocks = (prm.N * prm.Hkv + 3) / 4;  // four warps a block, one (token, head) each
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    with_kv_format(prm.format, [&](auto format) {
      constexpr KvFormat F = decltype(format)::value;
      auto* kernel = cuda::rows_in_chunks<T>(prm) ? &cuda::quantize_kv_append_kernel<T, F, 16 / sizeof(T)>
                                                  : &cuda::quantize_kv_append_kernel<T, F, 1>;
      launch_kernel("quantize_kv_append", kernel, dim3(static_cast<unsigned>(blocks)), dim3(128), 0,
                    static_cast<cudaStream_t>(stream), prm);
    });
  });
}

}  // namespace fastar
