// Torch glue of the CUDA fastar.attention: checks, allocation, stream, launch. Compiled twice: into
// fastar._C for the CUDA dispatch key, and (FASTAR_SIMT) into fastar._C_simt on CPU tensors.
#include <ATen/ops/empty.h>

#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops.h"
#include "ops/attention_args.h"

namespace fastar {

void run_attention_cuda(const AttentionLaunch& l, const char* op) {
  TORCH_CHECK_VALUE(l.prm.D <= kAttentionMaxHeadDim, op, ": the CUDA kernels take head dims up to ",
                    kAttentionMaxHeadDim, ", got ", l.prm.D);
  if (l.prm.B * l.prm.Hq * l.prm.Lq > 0) {
    const AttentionPlan plan = plan_attention(l.prm);
    // Partial results of the kv splits; stream-ordered by the caching allocator, so no sync is needed.
    at::Tensor workspace;
    if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, l.out.options().dtype(at::kFloat));
    launch_attention(l.prm, float_kind(l.out), plan, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                     DeviceScope::current_stream());
  }
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                          double scale, const std::optional<at::Tensor>& kv_lens,
                          const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right,
                          int64_t window_left, int64_t window_sinks, c10::string_view block_relation,
                          const std::optional<at::Tensor>& q_block_ids, const std::optional<at::Tensor>& k_block_ids,
                          const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
                          const std::optional<at::Tensor>& bias) {
  DeviceScope scope(q, "fastar.attention");
  const AttentionArgs args{kv_lens,        block_table, causal,      bottom_right, window_left,    window_sinks,
                           block_relation, q_block_ids, k_block_ids, mask_bits,    mask_bits_cols, bias};
  AttentionLaunch l = prepare_attention(q, k, v, out, scale, args);
  run_attention_cuda(l, "fastar.attention");
  return finish_attention(l);
}

}  // namespace fastar
