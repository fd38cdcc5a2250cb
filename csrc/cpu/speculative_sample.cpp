// fastar.speculative_sample on the CPU: argument checks (ops/acceptance_args.h), then the kernel of the
// active ISA (cpu/kernels/speculative_sample.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_token_ids,
                                                          const std::optional<at::Tensor>& draft_probs,
                                                          const at::Tensor& target_probs,
                                                          const std::optional<at::Tensor>& num_draft_tokens,
                                                          const at::Tensor& seed, const at::Tensor& offset) {
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset);
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.speculative_sample: expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint64_t>(offset.item<int64_t>()),
                          nullptr, nullptr};
  FASTAR_CPU_DISPATCH(speculative_sample, l.prm, float_kind(l.target_probs));
  raise_on_bad_rows("fastar.speculative_sample", l.prm.num_accepted, l.prm.B);
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
