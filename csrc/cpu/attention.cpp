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

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& kv_lens,
                                                 const std::optional<at::Tensor>& block_table,
                                                 const std::optional<at::Tensor>& q_block_ids,
                                                 const std::optional<at::Tensor>& k_block_ids,
                                                 const std::optional<at::Tensor>& mask_bits,
                                                 const std::optional<at::Tensor>& bias, at::IntArrayRef mask_config,
                                                 double scale) {
  AttentionLaunch l = prepare_attention(q, k, v, kv_lens, block_table, q_block_ids, k_block_ids, mask_bits, bias,
                                        mask_config, scale);
  run_attention_cpu(l);
  return {l.out, l.lse};
}

}  // namespace fastar
