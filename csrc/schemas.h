// The schema of every fastar op, in one place. Registered as torch.ops.fastar.* by registration.cpp and,
// for the test-only SIMT build, as torch.ops.fastar_simt.* by simt/registration_simt.cpp.
#pragma once
#include <torch/library.h>

namespace fastar {

inline void define_schemas(torch::Library& m) {
  m.def(
      "speculative_sample(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, "
      "Tensor? num_draft_tokens, Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted)");
  m.def(
      "greedy_verify(Tensor draft_token_ids, Tensor target_logits, Tensor? num_draft_tokens) "
      "-> (Tensor tokens, Tensor num_accepted)");
}

}  // namespace fastar
