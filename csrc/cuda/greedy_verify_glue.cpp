// Torch glue of the CUDA fastar.greedy_verify (compiled for CUDA and for the SIMT build, see glue.h).
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_greedy_verify_cuda(GreedyVerifyLaunch& l) {
  DeviceScope scope(l.target_logits, "fastar.greedy_verify");
  if (l.prm.B == 0) return;
  const FloatKind kind = float_kind(l.target_logits);
  const at::Tensor workspace =
      at::empty({greedy_verify_workspace(l.prm, kind)}, l.target_logits.options().dtype(at::kByte));
  launch_greedy_verify(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
