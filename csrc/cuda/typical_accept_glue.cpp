// Torch glue of the CUDA fastar.typical_accept: device, the rows' scratch, stream, launch. Compiled twice: into
// fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_typical_accept_cuda(TreeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.typical_accept");
  if (l.prm.B == 0) return;
  // Each row's TypicalNode per node (20 bytes: 3 int64 hold one); stream-ordered by the caching allocator.
  static_assert(sizeof(TypicalNode) <= 3 * sizeof(int64_t), "a TypicalNode fits in three int64");
  const at::Tensor nodes = at::empty({l.prm.B * l.prm.N * 3 + 1}, l.target_probs.options().dtype(at::kLong));
  l.prm.residual = reinterpret_cast<uint64_t*>(nodes.data_ptr<int64_t>());
  launch_typical_accept(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
