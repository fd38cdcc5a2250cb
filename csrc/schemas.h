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
  // Masked attention. Layout [B, H, L, D] (k, v as [num_pages, Hkv, page_size, D] with a block_table);
  // mask_config = [causal, bottom_right, window, window_left, window_sinks, block_relation, bits_cols]
  // (csrc/core/attention.h). Returns the output and the natural-log LSE [B, Hq, Lq] in float32.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, Tensor? block_table, Tensor? q_block_ids, "
      "Tensor? k_block_ids, Tensor? mask_bits, Tensor? bias, int[] mask_config, float scale) -> (Tensor out, Tensor lse)");
  // Next-scale (VAR) attention: the same kernels with scale ids, local window, tile map and qk_norm.
  // token_info [3, Lk] = (scale id, y, x) per token, query i = token Lk - Lq + i; scale_hw [S, 2];
  // tile_map uint8 [ceil(Lq / tile_q), ceil(Lk / tile_k)]; config = [relation, local_window, full_scales,
  // qk_norm, tile_q, tile_k] (csrc/ops/scale_attention_args.h).
  m.def(
      "scale_attention(Tensor q, Tensor k, Tensor v, Tensor? token_info, Tensor? scale_hw, Tensor? tile_map, "
      "Tensor? q_scale, int[] config, float scale) -> (Tensor out, Tensor lse)");
  // Classifier-free guidance of a doubled batch ([2B, V] or [2B, L, V], conditional rows first), top-k/top-p
  // filtering and sampling: int64 tokens [B] or [B, L] (csrc/ops/sample_cfg_args.h, csrc/core/sampling.h).
  m.def(
      "sample_cfg(Tensor logits, float cfg, str schedule, int? scale_index, int? num_scales, int top_k, float top_p, "
      "float temperature, Tensor seed, Tensor offset) -> Tensor tokens");
}

inline void register_cpu_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_cpu);
  m.impl("greedy_verify", &greedy_verify_cpu);
  m.impl("attention", &attention_cpu);
  m.impl("scale_attention", &scale_attention_cpu);
  m.impl("sample_cfg", &sample_cfg_cpu);
}

// The CUDA kernels' glue; registered for CUDA in fastar._C and for CPU tensors in the SIMT build.
inline void register_cuda_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_cuda);
  m.impl("greedy_verify", &greedy_verify_cuda);
  m.impl("attention", &attention_cuda);
  m.impl("scale_attention", &scale_attention_cuda);
  m.impl("sample_cfg", &sample_cfg_cuda);
}

}  // namespace fastar
