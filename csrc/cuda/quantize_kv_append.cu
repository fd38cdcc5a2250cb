#include "cuda/launchers.h"
#include "cuda/quantize_kv_append.cuh"

namespace fastar {

void launch_quantize_kv_append(const QuantizeKvParams& prm, FloatKind kind, void* stream) {
  const int64_t blocks = (prm.N * prm.Hkv + 3) / 4;  // four warps a block, one (token, head) each
  cuda::dispatch_device_float(kind, [&](auto tag) {
    with_kv_format(prm.format, [&](auto format) {
      launch_kernel("quantize_kv_append", &cuda::quantize_kv_append_kernel<decltype(tag), decltype(format)::value>,
                    dim3(static_cast<unsigned>(blocks)), dim3(128), 0, static_cast<cudaStream_t>(stream), prm);
    });
  });
}

}  // namespace fastar
