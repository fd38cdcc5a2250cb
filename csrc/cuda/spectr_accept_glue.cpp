// Torch glue of the CUDA fastar.spectr_accept: device, seed, stream, launch. Compiled twice: into fastar._C for the
// CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/spectr_args.h"

namespace fastar {

void run_spectr_accept_cuda(SpectrLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.spectr_accept");
  l.prm.seed = philox_seed(l.seed, l.offset);
  // The workspace of solved levels (spectr::Node per batch row, draft and level).
  const at::Tensor nodes = at::empty({l.prm.B * l.prm.K * l.prm.n * static_cast<int64_t>(sizeof(spectr::Node))},
                                     l.target_probs.options().dtype(at::kByte));
  l.prm.nodes = nodes.data_ptr();
  if (l.prm.B > 0) launch_spectr_accept(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
