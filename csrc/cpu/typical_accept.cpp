// fastar.typical_accept on the CPU (ops/acceptance_args.h): the kernel of the active ISA
// (cpu/kernels/typical_accept.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_typical_accept_cpu(TreeSampleLaunch& l) {
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.typical_accept: expected CPU tensors");
  FASTAR_CPU_DISPATCH(typical_accept, l.prm, float_kind(l.target_probs));
  raise_on_bad_rows("fastar.typical_accept", l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
