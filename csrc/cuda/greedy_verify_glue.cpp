// Torch glue of the CUDA fastar.greedy_verify (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_greedy_verify_cuda(GreedyVerifyLaunch& l) {
  DeviceScope scope(l.target_logits, "fastar.greedy_verify");
  if (l.prm.B > 0) launch_greedy_verify(l.prm, float_kind(l.target_logits), scope.stream());
}

}  // namespace fastar
