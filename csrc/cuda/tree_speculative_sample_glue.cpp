// Torch glue of the CUDA fastar.tree_speculative_sample: device, seed, the residual rows, stream, launch.
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
  // A row's weights once a node rejects a second child; stream-ordered by the caching allocator.
  const at::Tensor residual = at::empty({l.prm.B, l.prm.V}, l.target_probs.options().dtype(at::kLong));
  l.prm.residual = reinterpret_cast<uint64_t*>(residual.data_ptr<int64_t>());
  launch_tree_speculative_sample(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
