// fastar.tree_greedy_verify on the CPU (ops/acceptance_args.h): the kernel of the active ISA
// (cpu/kernels/tree_greedy_verify.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_tree_greedy_verify_cpu(TreeSampleLaunch& l) {
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.tree_greedy_verify: expected CPU tensors");
  FASTAR_CPU_DISPATCH(tree_greedy_verify, l.prm, float_kind(l.target_probs));
  raise_on_bad_rows("fastar.tree_greedy_verify", l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
