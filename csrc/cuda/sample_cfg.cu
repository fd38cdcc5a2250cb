#include "cuda/launchers.h"
#include "cuda/sample_cfg.cuh"

namespace fastar {

void launch_sample_cfg(const SampleCfgParams& prm, FloatKind kind, void* stream) {
  // Small vocabularies get two warps: each pass over the row is then still several tokens per thread.
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    const dim3 grid(static_cast<unsigned>(prm.B * prm.L));
    if (prm.V <= 1024) {
      launch_kernel("sample_cfg", &cuda::sample_cfg_kernel<P, 64>, grid, dim3(64), 0, static_cast<cudaStream_t>(stream),
                    prm);
    } else {
      launch_kernel("sample_cfg", &cuda::sample_cfg_kernel<P, 256>, grid, dim3(256), 0,
                    static_cast<cudaStream_t>(stream), prm);
    }
  });
}

}  // namespace fastar
