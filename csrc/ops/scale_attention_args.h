// Argument checks and kernel arguments of fastar.scale_attention: the attention kernels with the
// next-scale terms (scale ids as block ids, local window, tile map) and qk_norm. Shared by every backend.
#pragma once
#include <algorithm>
#include <tuple>

#include "ops/attention_args.h"

namespace fastar {

// The keyword arguments of the scale_attention op, in its schema's order (csrc/schemas.h says what each means).
struct ScaleAttentionArgs {
  std::optional<at::Tensor> token_info, scale_hw, tile_map;
  c10::string_view relation = "none";
  int64_t local_window = -1;
  int64_t full_scales = 0;
  bool qk_norm = false;
  std::optional<at::Tensor> q_scale;
  int64_t tile_q = 64;
  int64_t tile_k = 64;
};

// Checks and kernel arguments of everything but `out` (bind_out).
inline AttentionLaunch prepare_scale_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, const ScaleAttentionArgs& a) {
  constexpr const char* op = "fastar.scale_attention";
  const BlockRelation relation = parse_block_relation(op, "relation", a.relation);
  const int64_t window = a.local_window, full_scales = a.full_scales;
  TORCH_CHECK_VALUE(window >= -1 && full_scales >= 0, op,
                    ": local_window must be >= 0 (or -1 = off) and "
                    "full_scales >= 0, got ",
                    window, " and ", full_scales);
  const bool masked = relation != BlockRelation::kNone || window >= 0;
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, op, ": q, k and v must be 4-D [B, H, L, D]");
  const int64_t Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK_VALUE(!masked || Lq <= Lk, op, ": the queries are the last Lq of the Lk tokens, got Lq=", Lq,
                    " > Lk=", Lk);

  AttentionArgs mask;
  at::Tensor info;
  if (masked) {
    TORCH_CHECK_VALUE(a.token_info.has_value(), op, ": a scale relation or local window needs token_info");
    info = checked_index_tensor("token_info", *a.token_info, 2, q);
    TORCH_CHECK_VALUE(info.size(0) == 3 && info.size(1) == Lk, op, ": token_info must have shape [3, ", Lk, "], got ",
                      info.sizes());
    mask.block_relation = a.relation;
    mask.k_block_ids = info.narrow(0, 0, 1);
    mask.q_block_ids = info.narrow(0, 0, 1).narrow(1, Lk - Lq, Lq);
  }
  AttentionLaunch l = prepare_attention_inputs(q, k, v, scale, mask);
  AttentionParams& p = l.prm;
  AttentionMask& m = p.mask;
  if (masked) {
    l.token_info = info;
    m.q_block_ids = info.data_ptr<int32_t>() + (Lk - Lq);
    m.k_block_ids = info.data_ptr<int32_t>();
    m.q_block_sb = m.k_block_sb = 0;
    m.tok_y = info.data_ptr<int32_t>() + Lk;
    m.tok_x = info.data_ptr<int32_t>() + 2 * Lk;
    m.q_token_offset = Lk - Lq;
    m.full_scales = full_scales;
    if (window >= 0) {
      TORCH_CHECK_VALUE(a.scale_hw.has_value(), op, ": a local window needs scale_hw");
      l.scale_hw = checked_index_tensor("scale_hw", *a.scale_hw, 2, q);
      TORCH_CHECK_VALUE(l.scale_hw->size(1) == 2 && l.scale_hw->size(0) > 0, op,
                        ": scale_hw must have shape [num_scales, 2], got ", l.scale_hw->sizes());
      // A window past 2^29 cells restricts nothing on any grid; clamped, the kernels' cell arithmetic stays in 32 bits.
      m.scale_window = std::min<int64_t>(window, int64_t{1} << 29);
      m.num_scales = l.scale_hw->size(0);
      m.scale_hw = l.scale_hw->data_ptr<int32_t>();
      if (info.is_cpu()) {
        const int32_t* ids = m.k_block_ids;
        for (int64_t t = 0; t < Lk; ++t)
          TORCH_CHECK_INDEX(ids[t] >= 0 && ids[t] < m.num_scales, op, ": token ", t, " has scale id ", ids[t],
                            " outside [0, ", m.num_scales, ")");
        const int32_t* hw = m.scale_hw;
        for (int64_t s = 0; s < 2 * m.num_scales; ++s)
          TORCH_CHECK_VALUE(hw[s] > 0, op, ": scale_hw must hold positive sizes, got ", hw[s]);
      }
    }
  }
  if (a.tile_map) {
    const int64_t tq = a.tile_q, tk = a.tile_k;
    TORCH_CHECK_VALUE(tq > 0 && tk > 0, op, ": tile sizes must be positive, got ", tq, " and ", tk);
    TORCH_CHECK_TYPE(a.tile_map->scalar_type() == at::kByte, op, ": tile_map must be uint8, got ",
                     a.tile_map->scalar_type());
    check_same_device(op, "tile_map", *a.tile_map, q);
    TORCH_CHECK_VALUE(a.tile_map->dim() == 2 && a.tile_map->size(0) == (Lq + tq - 1) / tq &&
                          a.tile_map->size(1) == (Lk + tk - 1) / tk,
                      op, ": tile_map must have shape [", (Lq + tq - 1) / tq, ", ", (Lk + tk - 1) / tk, "], got ",
                      a.tile_map->sizes());
    l.tile_map = a.tile_map->contiguous();
    m.tile_map = l.tile_map->data_ptr<uint8_t>();
    m.tile_q = tq;
    m.tile_k = tk;
    m.tile_cols = l.tile_map->size(1);
  }
  if (a.qk_norm) {
    p.qk_norm = true;
    if (a.q_scale) {
      TORCH_CHECK_TYPE(a.q_scale->scalar_type() == at::kFloat, op, ": q_scale must be float32, got ",
                       a.q_scale->scalar_type());
      TORCH_CHECK_VALUE(a.q_scale->dim() == 1 && a.q_scale->size(0) == p.Hq, op, ": q_scale must have shape [", p.Hq,
                        "], got ", a.q_scale->sizes());
      check_same_device(op, "q_scale", *a.q_scale, q);
      l.q_scale = a.q_scale->contiguous();
      p.q_scale = l.q_scale->data_ptr<float>();
    }
  } else {
    TORCH_CHECK_VALUE(!a.q_scale.has_value(), op, ": q_scale is only used with qk_norm");
  }
  return l;
}

inline AttentionLaunch prepare_scale_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& out, double scale, const ScaleAttentionArgs& a) {
  AttentionLaunch l = prepare_scale_attention_inputs(q, k, v, scale, a);
  bind_out(l, out, "fastar.scale_attention");
  return l;
}

// The op as its schema declares it (csrc/schemas.h): the attention kernels of a backend (Run is
// run_attention_cpu or run_attention_cuda) with the next-scale terms.
template <void (*Run)(const AttentionLaunch&, const char*)>
at::Tensor scale_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              double scale, const std::optional<at::Tensor>& token_info,
                              const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map,
                              c10::string_view relation, int64_t local_window, int64_t full_scales, bool qk_norm,
                              const std::optional<at::Tensor>& q_scale, int64_t tile_q, int64_t tile_k) {
  const ScaleAttentionArgs args{token_info,  scale_hw, tile_map, relation, local_window,
                                full_scales, qk_norm,  q_scale,  tile_q,   tile_k};
  AttentionLaunch l = prepare_scale_attention(q, k, v, out, scale, args);
  Run(l, "fastar.scale_attention");
  return finish_attention(l);
}

// Test-only (csrc/schemas.h): the CPU attention kernel's plan (cpu/attention.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_plan_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right, int64_t window_left,
    int64_t window_sinks, c10::string_view block_relation, const std::optional<at::Tensor>& q_block_ids,
    const std::optional<at::Tensor>& k_block_ids, const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& token_info,
    const std::optional<at::Tensor>& scale_hw, const std::optional<at::Tensor>& tile_map, c10::string_view relation,
    int64_t local_window, int64_t full_scales, int64_t tile_q, int64_t tile_k);

}  // namespace fastar
