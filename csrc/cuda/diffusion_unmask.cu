#include "cuda/diffusion_unmask.cuh"
#include "cuda/diffusion_unmask_launch.h"

namespace fastar {

void launch_diffusion_unmask(const DiffusionUnmaskParams& prm, FloatKind kind, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Small vocabularies get two warps: each pass over the row is then still several tokens per thread.
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    const dim3 grid(static_cast<unsigned>(prm.B * prm.block_len));
    if (prm.V <= 1024) {
      launch_kernel("diffusion_unmask", &cuda::diffusion_scores_kernel<P, 64>, grid, dim3(64), 0, s, prm);
    } else {
      launch_kernel("diffusion_unmask", &cuda::diffusion_scores_kernel<P, 256>, grid, dim3(256), 0, s, prm);
    }
  });
  launch_kernel("diffusion_unmask", &cuda::diffusion_select_kernel<128>, dim3(static_cast<unsigned>(prm.B)), dim3(128),
                0, s, prm);
}

}  // namespace fastar
