// Every op's per-device implementation, as registered by registration.cpp (and for the SIMT build by
// simt/registration_simt.cpp). Implementations include only ATen's Tensor headers: torch/library.h costs
// ~10 s of compile time per file, so only the registration files include it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastar {

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_token_ids,
                                                          const std::optional<at::Tensor>& draft_probs,
                                                          const at::Tensor& target_probs,
                                                          const std::optional<at::Tensor>& num_draft_tokens,
                                                          const at::Tensor& seed, const at::Tensor& offset);
std::tuple<at::Tensor, at::Tensor> greedy_verify_cpu(const at::Tensor& draft_token_ids, const at::Tensor& target_logits,
                                                     const std::optional<at::Tensor>& num_draft_tokens);
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         double scale, const std::optional<at::Tensor>& kv_lens,
                         const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right,
                         int64_t window_left, int64_t window_sinks, c10::string_view block_relation,
                         const std::optional<at::Tensor>& q_block_ids, const std::optional<at::Tensor>& k_block_ids,
                         const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
                         const std::optional<at::Tensor>& bias);
at::Tensor scale_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               double scale, const std::optional<at::Tensor>& token_info,
                               const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map,
                               c10::string_view relation, int64_t local_window, int64_t full_scales, bool qk_norm,
                               const std::optional<at::Tensor>& q_scale, int64_t tile_q, int64_t tile_k);
at::Tensor sample_cfg_cpu(const at::Tensor& logits, double cfg, c10::string_view schedule,
                          std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                          double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset);
// Test-only (csrc/schemas.h): the CPU attention kernel's plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_plan_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right, int64_t window_left,
    int64_t window_sinks, c10::string_view block_relation, const std::optional<at::Tensor>& q_block_ids,
    const std::optional<at::Tensor>& k_block_ids, const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& token_info,
    const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map, c10::string_view relation,
    int64_t local_window, int64_t full_scales, int64_t tile_q, int64_t tile_k);

// The CUDA glue (csrc/cuda/*_glue.cpp): CUDA tensors in fastar._C, CPU tensors in the SIMT build.
std::tuple<at::Tensor, at::Tensor> speculative_sample_cuda(const at::Tensor& draft_token_ids,
                                                           const std::optional<at::Tensor>& draft_probs,
                                                           const at::Tensor& target_probs,
                                                           const std::optional<at::Tensor>& num_draft_tokens,
                                                           const at::Tensor& seed, const at::Tensor& offset);
std::tuple<at::Tensor, at::Tensor> greedy_verify_cuda(const at::Tensor& draft_token_ids,
                                                      const at::Tensor& target_logits,
                                                      const std::optional<at::Tensor>& num_draft_tokens);
at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                          double scale, const std::optional<at::Tensor>& kv_lens,
                          const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right,
                          int64_t window_left, int64_t window_sinks, c10::string_view block_relation,
                          const std::optional<at::Tensor>& q_block_ids, const std::optional<at::Tensor>& k_block_ids,
                          const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
                          const std::optional<at::Tensor>& bias);
at::Tensor scale_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                double scale, const std::optional<at::Tensor>& token_info,
                                const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map,
                                c10::string_view relation, int64_t local_window, int64_t full_scales, bool qk_norm,
                                const std::optional<at::Tensor>& q_scale, int64_t tile_q, int64_t tile_k);
at::Tensor sample_cfg_cuda(const at::Tensor& logits, double cfg, c10::string_view schedule,
                           std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                           double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset);

}  // namespace fastar
