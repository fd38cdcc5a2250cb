// fastar.scale_attention on the CPU: the attention kernel (cpu/attention.cpp) with the next-scale terms.
#include "ops.h"
#include "ops/scale_attention_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> scale_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& token_info,
                                                       const std::optional<at::Tensor>& scale_hw,
                                                       const std::optional<at::Tensor>& tile_map,
                                                       const std::optional<at::Tensor>& q_scale,
                                                       at::IntArrayRef config, double scale) {
  AttentionLaunch l = prepare_scale_attention(q, k, v, token_info, scale_hw, tile_map, q_scale, config, scale);
  run_attention_cpu(l);
  return {l.out, l.lse};
}

}  // namespace fastar
