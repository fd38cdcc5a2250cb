// fastar.attention and fastar.scale_attention on the CPU (ops/attention_args.h, ops/scale_attention_args.h): the
// kernel of the active ISA (cpu/kernels/attention.cpp); and the test-only op _attention_plan, which returns its plan.
#include <ATen/ops/tensor.h>

#include <cstring>
#include <vector>

#include "cpu/attention_plan.h"
#include "cpu/kernels/attention.h"
#include "ops/scale_attention_args.h"

namespace fastar {

void run_attention_cpu(const AttentionLaunch& l, const char* op) {
  TORCH_CHECK_VALUE(l.out.is_cpu(), op, ": expected CPU tensors");
  if (l.prm.B * l.prm.Hq * l.prm.Lq > 0) FASTAR_CPU_DISPATCH(attention, l.prm, float_kind(l.out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_plan_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right, int64_t window_left,
    int64_t window_sinks, c10::string_view block_relation, const std::optional<at::Tensor>& q_block_ids,
    const std::optional<at::Tensor>& k_block_ids, const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& token_info,
    const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map, c10::string_view relation,
    int64_t local_window, int64_t full_scales, int64_t tile_q, int64_t tile_k) {
  constexpr const char* op = "fastar._attention_plan";
  const AttentionArgs args{kv_lens,        block_table, causal,      bottom_right, window_left,    window_sinks,
                           block_relation, q_block_ids, k_block_ids, mask_bits,    mask_bits_cols, bias};
  const bool scale_mask =
      token_info || scale_hw || tile_map || relation != "none" || local_window != -1 || full_scales != 0;
  if (scale_mask) {
    const AttentionArgs none{};
    TORCH_CHECK_VALUE(!kv_lens && !block_table && !causal && bottom_right == none.bottom_right &&
                          window_left == none.window_left && window_sinks == none.window_sinks &&
                          block_relation == "none" && !q_block_ids && !k_block_ids && !mask_bits &&
                          mask_bits_cols == 0 && !bias,
                      op, ": give the mask arguments of attention or those of scale_attention, not both");
  }
  // Only shapes are read: k stands in for v, and the scale is irrelevant.
  const AttentionLaunch l = scale_mask ? prepare_scale_attention_inputs(
                                             q, k, k, 1.0,
                                             ScaleAttentionArgs{token_info, scale_hw, tile_map, relation, local_window,
                                                                full_scales, false, std::nullopt, tile_q, tile_k})
                                       : prepare_attention_inputs(q, k, k, 1.0, args);
  const AttentionParams& p = l.prm;
  TORCH_CHECK_VALUE(p.B * p.Hq * p.Lq > 0, op, ": q has no rows to plan (shape ", q.sizes(), ")");
  const cpu::AttentionPlan plan(p);
  std::vector<int64_t> positions(static_cast<size_t>(p.Lq)), starts(static_cast<size_t>(plan.n_q_tiles() + 1));
  for (int64_t i = 0; i < p.Lq; ++i) positions[static_cast<size_t>(i)] = plan.position(i);
  for (int64_t t = 0; t <= plan.n_q_tiles(); ++t) starts[static_cast<size_t>(t)] = plan.tile_start(t);
  std::vector<int64_t> steps, keys;
  std::vector<uint8_t> visible;
  cpu::KeyPlan scratch;
  for (int64_t item = 0; item < plan.items(); ++item) {
    const cpu::AttentionItem it = plan.item_at(item);
    for (int64_t split = 0; split < plan.splits(); ++split) {
      const cpu::AttentionPlan::Steps todo = plan.steps(item, split, scratch);
      for (int64_t i = todo.begin; i < todo.end; ++i) {
        const cpu::TileKeys tk = todo.plan->keys(i);
        steps.insert(steps.end(), {it.b, it.hkv, item % plan.n_q_tiles(), split, tk.p0, tk.np, tk.n});
        for (int64_t c = 0; c < tk.n; ++c) keys.push_back(tk.at(c));
        if (tk.vis)
          visible.insert(visible.end(), tk.vis, tk.vis + tk.n * tk.np);
        else
          visible.insert(visible.end(), static_cast<size_t>(tk.n * tk.np), 1);
      }
    }
  }
  auto int64 = [](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong); };
  at::Tensor vis = at::empty({static_cast<int64_t>(visible.size())}, at::kByte);
  if (!visible.empty()) std::memcpy(vis.data_ptr<uint8_t>(), visible.data(), visible.size());
  return {int64(positions), int64(starts), int64(steps).view({-1, 7}), int64(keys), vis};
}

}  // namespace fastar
