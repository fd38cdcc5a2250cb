// Torch glue of the CUDA fastar.sample_cfg (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"
#include "ops/sample_cfg_args.h"

namespace fastar {

at::Tensor sample_cfg_cuda(const at::Tensor& logits, double cfg, c10::string_view schedule,
                           std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                           double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset) {
  DeviceScope scope(logits, "fastar.sample_cfg");
  SampleCfgLaunch l =
      prepare_sample_cfg(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset);
  l.prm.seed = philox_seed(seed, offset);
  if (l.prm.B * l.prm.L > 0) launch_sample_cfg(l.prm, float_kind(l.logits), scope.stream());
  return l.tokens;
}

}  // namespace fastar
