// fastar.greedy_verify on the CPU (ops/acceptance_args.h): the kernel of the active ISA
// (cpu/kernels/greedy_verify.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_greedy_verify_cpu(GreedyVerifyLaunch& l) {
  TORCH_CHECK_VALUE(l.target_logits.is_cpu(), "fastar.greedy_verify: expected CPU tensors");
  FASTAR_CPU_DISPATCH(greedy_verify, l.prm, float_kind(l.target_logits));
  raise_on_bad_rows("fastar.greedy_verify", l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
