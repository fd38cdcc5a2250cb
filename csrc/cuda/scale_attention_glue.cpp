// Torch glue of the CUDA fastar.scale_attention: the attention kernels (cuda/attention.cu) with the
// next-scale terms. Compiled into fastar._C and (FASTAR_SIMT) into fastar._C_simt, like every glue file.
#include "cuda/glue.h"
#include "ops.h"
#include "ops/scale_attention_args.h"

namespace fastar {

std::tuple<at::Tensor, at::Tensor> scale_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& token_info,
                                                        const std::optional<at::Tensor>& scale_hw,
                                                        const std::optional<at::Tensor>& tile_map,
                                                        const std::optional<at::Tensor>& q_scale,
                                                        at::IntArrayRef config, double scale) {
  DeviceScope scope(q, "fastar.scale_attention");
  AttentionLaunch l = prepare_scale_attention(q, k, v, token_info, scale_hw, tile_map, q_scale, config, scale);
  run_attention_cuda(l, "fastar.scale_attention");
  return {l.out, l.lse};
}

}  // namespace fastar
