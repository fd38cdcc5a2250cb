// Torch glue of the CUDA fastar.tree_greedy_verify: device, the workspace, stream, launch. Compiled twice:
// into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_tree_greedy_verify_cuda(TreeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.tree_greedy_verify");
  if (l.prm.B == 0) return;
  // The rows' notes and the chunks' argmaxes; stream-ordered by the caching allocator.
  const FloatKind kind = float_kind(l.target_probs);
  const at::Tensor workspace =
      at::empty({tree_greedy_verify_workspace(l.prm, kind)}, l.target_probs.options().dtype(at::kByte));
  launch_tree_greedy_verify(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
