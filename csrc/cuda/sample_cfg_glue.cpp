// Torch glue of the CUDA fastar.sample_cfg (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/sample_cfg_args.h"

namespace fastar {

void run_sample_cfg_cuda(SampleCfgLaunch& l) {
  DeviceScope scope(l.logits, "fastar.sample_cfg");
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B * l.prm.L > 0) launch_sample_cfg(l.prm, float_kind(l.logits), scope.stream());
}

}  // namespace fastar
