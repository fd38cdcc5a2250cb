// Torch glue of the CUDA fastar.attention and fastar.scale_attention: device, stream, workspace, launch.
// Compiled twice: into fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/attention_args.h"

namespace fastar {

void run_attention_cuda(const AttentionLaunch& l, const char* op) {
  DeviceScope scope(l.out, op);
  TORCH_CHECK_VALUE(l.prm.D <= kAttentionMaxHeadDim, op, ": the CUDA kernels take head dims up to ",
                    kAttentionMaxHeadDim, ", got ", l.prm.D);
  if (l.prm.B * l.prm.Hq * l.prm.Lq > 0) {
    const AttentionPlan plan = plan_attention(l.prm, float_kind(l.out));
    // Partial results of the kv splits; stream-ordered by the caching allocator, so no sync is needed.
    at::Tensor workspace;
    if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, l.out.options().dtype(at::kFloat));
    launch_attention(l.prm, float_kind(l.out), plan, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                     DeviceScope::current_stream());
  }
}

}  // namespace fastar
