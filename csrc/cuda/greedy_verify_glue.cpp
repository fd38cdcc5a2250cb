// Torch glue of the CUDA fastar.greedy_verify (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> greedy_verify_cuda(const at::Tensor& draft_token_ids,
                                                      const at::Tensor& target_logits,
                                                      const std::optional<at::Tensor>& num_draft_tokens) {
  DeviceScope scope(target_logits, "fastar.greedy_verify");
  GreedyVerifyLaunch l = prepare_greedy_verify(draft_token_ids, target_logits, num_draft_tokens);
  if (l.prm.B > 0) launch_greedy_verify(l.prm, float_kind(l.target_logits), scope.stream());
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
