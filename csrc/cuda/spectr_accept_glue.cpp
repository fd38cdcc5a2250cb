// Torch glue of the CUDA fastar.spectr_accept: device, seed, stream, launch. Compiled twice: into fastar._C for the
// CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/spectr_args.h"

namespace fastar {

void run_spectr_accept_cuda(SpectrLaunch& l) {
  DeviceScope scope(l.target_probs, "fastar.spectr_accept");
  l.prm.seed = philox_seed(l.seed, l.offset);
  if (l.prm.B > 0) launch_spectr_accept(l.prm, float_kind(l.target_probs), scope.stream());
}

}  // namespace fastar
