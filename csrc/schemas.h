// The schema of every fastar op and the tables of its kernels, in one place. Included by the two
// registration files: registration.cpp (torch.ops.fastar) and simt/registration_simt.cpp
// (torch.ops.fastar_simt, the test-only SIMT build).
#pragma once
#include <torch/library.h>

#include "ops.h"

namespace fastar {

inline void define_schemas(torch::Library& m) {
  m.def(
      "speculative_sample(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, "
      "Tensor? num_draft_tokens, Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted)");
  m.def(
      "greedy_verify(Tensor draft_token_ids, Tensor target_logits, Tensor? num_draft_tokens) "
      "-> (Tensor tokens, Tensor num_accepted)");
}

inline void register_cpu_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_cpu);
  m.impl("greedy_verify", &greedy_verify_cpu);
}

// The CUDA kernels' glue; registered for CUDA in fastar._C and for CPU tensors in the SIMT build.
inline void register_cuda_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_cuda);
  m.impl("greedy_verify", &greedy_verify_cuda);
}

}  // namespace fastar
