// Torch glue of the CUDA fastar.tree_greedy_verify: device, the rows' scratch, stream, launch. Compiled twice:
// into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_tree_greedy_verify_cuda(TreeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.tree_greedy_verify");
  if (l.prm.B == 0) return;
  // Each row's argmax after every node and depth of every node; stream-ordered by the caching allocator.
  const at::Tensor notes = at::empty({l.prm.B, 2 * l.prm.N + 1}, l.target_probs.options().dtype(at::kLong));
  l.prm.residual = reinterpret_cast<uint64_t*>(notes.data_ptr<int64_t>());
  launch_tree_greedy_verify(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
