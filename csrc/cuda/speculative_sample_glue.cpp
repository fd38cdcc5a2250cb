// Torch glue of the CUDA fastar.speculative_sample and fastar.lantern_accept: device, seed, stream, launch.
// Compiled twice: into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_speculative_sample_cuda(SpeculativeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, l.op);
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B > 0) launch_speculative_sample(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
