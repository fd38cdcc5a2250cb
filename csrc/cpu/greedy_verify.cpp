// fastar.greedy_verify on the CPU: argument checks (ops/acceptance_args.h), then the kernel of the active ISA
// (cpu/kernels/greedy_verify.cpp); invalid rows raise.
#include "cpu/kernels/acceptance.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> greedy_verify_cpu(const at::Tensor& draft_token_ids, const at::Tensor& target_logits,
                                                     const std::optional<at::Tensor>& num_draft_tokens) {
  GreedyVerifyLaunch l = prepare_greedy_verify(draft_token_ids, target_logits, num_draft_tokens);
  TORCH_CHECK_VALUE(l.target_logits.is_cpu(), "fastar.greedy_verify: expected CPU tensors");
  FASTAR_CPU_DISPATCH(greedy_verify, l.prm, float_kind(l.target_logits));
  raise_on_bad_rows("fastar.greedy_verify", l.prm.num_accepted, l.prm.B);
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
