// Torch glue of the CUDA fastar.spectr_accept: device, seed, stream, workspace, launch. Compiled twice: into fastar._C
// for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/spectr_args.h"

namespace fastar {

void run_spectr_accept_cuda(SpectrLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.spectr_accept");
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B == 0) return;
  const FloatKind kind = float_kind(l.target_probs);
  const at::Tensor workspace =
      at::empty({spectr_accept_workspace(l.prm, kind)}, l.target_probs.options().dtype(at::kByte));
  launch_spectr_accept(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
