// Torch glue of the CUDA fastar.spectr_accept: device, seed, stream, workspace, launch. Compiled twice: into fastar._C
// for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/zeros.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/spectr_args.h"

namespace fastar {

void run_spectr_accept_cuda(SpectrLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.spectr_accept");
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B == 0) return;
  const FloatKind kind = float_kind(l.target_probs);
  // Zeroed: a split solve's merged sums and counts start at 0 (the rest is written before it is read).
  const at::Tensor workspace =
      at::zeros({spectr_accept_workspace(l.prm, kind)}, l.target_probs.options().dtype(at::kByte));
  launch_spectr_accept(l.prm, kind, workspace.data_ptr(), scope.stream());
}

}  // namespace fastar
