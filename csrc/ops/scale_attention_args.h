// Argument checks and kernel arguments of fastar.scale_attention: the attention kernels with the
// next-scale terms (scale ids as block ids, local window, tile map) and qk_norm. Shared by every backend.
#pragma once
#include "ops/attention_args.h"

namespace fastar {

// config = [relation, local_window, full_scales, qk_norm, tile_q, tile_k]
constexpr int64_t kScaleConfigSize = 6;

inline AttentionLaunch prepare_scale_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& token_info,
                                               const std::optional<at::Tensor>& scale_hw,
                                               const std::optional<at::Tensor>& tile_map,
                                               const std::optional<at::Tensor>& q_scale, at::IntArrayRef config,
                                               double scale) {
  constexpr const char* op = "fastar.scale_attention";
  TORCH_CHECK_VALUE(config.size() == kScaleConfigSize, op, ": config must hold ", kScaleConfigSize, " values");
  const int64_t relation = config[0], window = config[1], full_scales = config[2];
  TORCH_CHECK_VALUE(relation >= 0 && relation <= 3, op, ": unknown scale relation ", relation);
  TORCH_CHECK_VALUE(window >= -1 && full_scales >= 0, op, ": local_window must be >= 0 (or -1 = off) and "
                    "full_scales >= 0, got ", window, " and ", full_scales);
  const bool masked = relation != 0 || window >= 0;
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, op, ": q, k and v must be 4-D [B, H, L, D]");
  const int64_t Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK_VALUE(!masked || Lq <= Lk, op, ": the queries are the last Lq of the Lk tokens, got Lq=", Lq,
                    " > Lk=", Lk);

  std::optional<at::Tensor> q_ids, k_ids;
  at::Tensor info;
  if (masked) {
    TORCH_CHECK_VALUE(token_info.has_value(), op, ": a scale relation or local window needs token_info");
    info = checked_index_tensor("token_info", *token_info, 2, q);
    TORCH_CHECK_VALUE(info.size(0) == 3 && info.size(1) == Lk, op, ": token_info must have shape [3, ", Lk,
                      "], got ", info.sizes());
    k_ids = info.narrow(0, 0, 1);
    q_ids = info.narrow(0, 0, 1).narrow(1, Lk - Lq, Lq);
  }
  const int64_t mask_config[kMaskConfigSize] = {0, 0, 0, 0, 0, relation, 0};
  AttentionLaunch l = prepare_attention(q, k, v, std::nullopt, std::nullopt, q_ids, k_ids, std::nullopt, std::nullopt,
                                        mask_config, scale);
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
      TORCH_CHECK_VALUE(scale_hw.has_value(), op, ": a local window needs scale_hw");
      l.scale_hw = checked_index_tensor("scale_hw", *scale_hw, 2, q);
      TORCH_CHECK_VALUE(l.scale_hw->size(1) == 2 && l.scale_hw->size(0) > 0, op,
                        ": scale_hw must have shape [num_scales, 2], got ", l.scale_hw->sizes());
      m.scale_window = window;
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
  if (tile_map) {
    const int64_t tq = config[4], tk = config[5];
    TORCH_CHECK_VALUE(tq > 0 && tk > 0, op, ": tile sizes must be positive, got ", tq, " and ", tk);
    TORCH_CHECK_TYPE(tile_map->scalar_type() == at::kByte, op, ": tile_map must be uint8, got ",
                     tile_map->scalar_type());
    check_same_device(op, "tile_map", *tile_map, q);
    TORCH_CHECK_VALUE(tile_map->dim() == 2 && tile_map->size(0) == (Lq + tq - 1) / tq &&
                          tile_map->size(1) == (Lk + tk - 1) / tk,
                      op, ": tile_map must have shape [", (Lq + tq - 1) / tq, ", ", (Lk + tk - 1) / tk, "], got ",
                      tile_map->sizes());
    l.tile_map = tile_map->contiguous();
    m.tile_map = l.tile_map->data_ptr<uint8_t>();
    m.tile_q = tq;
    m.tile_k = tk;
    m.tile_cols = l.tile_map->size(1);
  }
  if (config[3] != 0) {
    p.qk_norm = true;
    if (q_scale) {
      TORCH_CHECK_TYPE(q_scale->scalar_type() == at::kFloat, op, ": q_scale must be float32, got ",
                       q_scale->scalar_type());
      TORCH_CHECK_VALUE(q_scale->dim() == 1 && q_scale->size(0) == p.Hq, op, ": q_scale must have shape [", p.Hq,
                        "], got ", q_scale->sizes());
      check_same_device(op, "q_scale", *q_scale, q);
      l.q_scale = q_scale->contiguous();
      p.q_scale = l.q_scale->data_ptr<float>();
    }
  } else {
    TORCH_CHECK_VALUE(!q_scale.has_value(), op, ": q_scale is only used with qk_norm");
  }
  return l;
}

}  // namespace fastar
