// Torch glue of the CUDA fastar.diffusion_unmask (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/diffusion_unmask_launch.h"
#include "cuda/glue.h"
#include "ops/diffusion_unmask_args.h"

namespace fastar {

void run_diffusion_unmask_cuda(DiffusionUnmaskLaunch& l) {
  DeviceScope scope(l.logits, "fastar.diffusion_unmask");
  l.prm.seed = philox_seed(l.seed, l.offset);
  const at::Tensor sorted = at::empty({l.prm.B, l.prm.block_len}, l.logits.options().dtype(at::kFloat));
  l.prm.sorted = sorted.data_ptr<float>();
  if (l.prm.B > 0) launch_diffusion_unmask(l.prm, float_kind(l.logits), scope.stream());
}

}  // namespace fastar
