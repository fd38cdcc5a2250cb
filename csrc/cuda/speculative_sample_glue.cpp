// Torch glue of the CUDA fastar.speculative_sample: checks, allocation, stream, launch. Compiled twice:
// into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> speculative_sample_cuda(const at::Tensor& draft_token_ids,
                                                           const std::optional<at::Tensor>& draft_probs,
                                                           const at::Tensor& target_probs,
                                                           const std::optional<at::Tensor>& num_draft_tokens,
                                                           const at::Tensor& seed, const at::Tensor& offset) {
  DeviceScope scope(target_probs, "fastar.speculative_sample");
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset);
  l.prm.seed = philox_seed(seed, offset);
  if (l.prm.B > 0) launch_speculative_sample(l.prm, float_kind(l.target_probs), scope.stream());
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
