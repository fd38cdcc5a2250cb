// Torch glue of the CUDA fastar.typical_accept: device, the workspace, stream, launch. Compiled twice: into
// fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_typical_accept_cuda(TreeSampleLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.typical_accept");
  if (l.prm.B == 0) return;
  // The rows' nodes and the chunks' statistics; stream-ordered by the caching allocator.
  const FloatKind kind = float_kind(l.target_probs);
  const at::Tensor workspace =
      at::empty({typical_accept_workspace(l.prm, kind)}, l.target_probs.options().dtype(at::kByte));
  launch_typical_accept(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
