// fastar.speculative_sample and fastar.lantern_accept on the CPU (ops/acceptance_args.h): the kernel of the active ISA
// (cpu/kernels/speculative_sample.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops/acceptance_args.h"

namespace fastar {

void run_speculative_sample_cpu(SpeculativeSampleLaunch& l) {
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), l.op, ": expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(l.seed.item<int64_t>()),
                          static_cast<uint64_t>(l.offset.item<int64_t>()), nullptr, nullptr};
  FASTAR_CPU_DISPATCH(speculative_sample, l.prm, float_kind(l.target_probs));
  raise_on_bad_rows(l.op, l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
