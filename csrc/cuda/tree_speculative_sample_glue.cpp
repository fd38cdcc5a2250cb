// Torch glue of the CUDA fastar.tree_speculative_sample: device, seed, the workspace, stream, launch.
// Compiled twice: into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_tree_speculative_sample_cuda(TreeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.tree_speculative_sample");
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B == 0) return;
  // The rows' walks, weights and chunk sums; stream-ordered by the caching allocator.
  const FloatKind kind = float_kind(l.target_probs);
  const at::Tensor workspace =
      at::empty({tree_speculative_sample_workspace(l.prm, kind)}, l.target_probs.options().dtype(at::kByte));
  launch_tree_speculative_sample(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
