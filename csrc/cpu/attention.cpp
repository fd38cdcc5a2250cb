// fastar.attention on the CPU: argument checks (ops/attention_args.h), then the kernel of the active ISA
// (cpu/kernels/attention.cpp).
#include "cpu/kernels/attention.h"
#include "ops.h"
#include "ops/attention_args.h"

namespace fastar {

void run_attention_cpu(const AttentionLaunch& l) {
  TORCH_CHECK_VALUE(l.out.is_cpu(), "fastar.attention: expected CPU tensors");
  if (l.prm.B * l.prm.Hq * l.prm.Lq > 0) FASTAR_CPU_DISPATCH(attention, l.prm, float_kind(l.out));
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                          double scale, const std::optional<at::Tensor>& kv_lens,
                          const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right,
                          int64_t window_left, int64_t window_sinks, c10::string_view block_relation,
                          const std::optional<at::Tensor>& q_block_ids, const std::optional<at::Tensor>& k_block_ids,
                          const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
                          const std::optional<at::Tensor>& bias) {
  const AttentionArgs args{kv_lens, block_table, causal, bottom_right, window_left, window_sinks,
                           block_relation, q_block_ids, k_block_ids, mask_bits, mask_bits_cols, bias};
  AttentionLaunch l = prepare_attention(q, k, v, out, scale, args);
  run_attention_cpu(l);
  return finish_attention(l);
}

}  // namespace fastar
