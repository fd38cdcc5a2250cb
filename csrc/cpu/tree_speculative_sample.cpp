// fastar.tree_speculative_sample on the CPU (ops/acceptance_args.h): the kernel of the active ISA
// (cpu/kernels/tree_speculative_sample.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_tree_speculative_sample_cpu(TreeSampleLaunch& l) {
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.tree_speculative_sample: expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(l.seed.item<int64_t>()),
                          static_cast<uint64_t>(l.offset.item<int64_t>()), nullptr, nullptr};
  FASTAR_CPU_DISPATCH(tree_speculative_sample, l.prm, float_kind(l.target_probs));
  raise_on_bad_rows("fastar.tree_speculative_sample", l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
