// fastar.scale_attention on the CPU: the attention kernel (cpu/attention.cpp) with the next-scale terms.
#include "ops.h"
#include "ops/scale_attention_args.h"

namespace fastar {

at::Tensor scale_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               double scale, const std::optional<at::Tensor>& token_info,
                               const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map,
                               c10::string_view relation, int64_t local_window, int64_t full_scales, bool qk_norm,
                               const std::optional<at::Tensor>& q_scale, int64_t tile_q, int64_t tile_k) {
  const ScaleAttentionArgs args{token_info,  scale_hw, tile_map, relation, local_window,
                                full_scales, qk_norm,  q_scale,  tile_q,   tile_k};
  AttentionLaunch l = prepare_scale_attention(q, k, v, out, scale, args);
  run_attention_cpu(l);
  return finish_attention(l);
}

}  // namespace fastar
