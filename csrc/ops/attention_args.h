// Argument checks, output allocation and kernel arguments of fastar.attention, shared by every backend.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "core/attention.h"
#include "ops/acceptance_args.h"

namespace fastar {

// mask_config = [causal, bottom_right, window, window_left, window_sinks, block_relation, bits_cols]
constexpr int64_t kMaskConfigSize = 7;

struct AttentionLaunch {
  at::Tensor q, k, v, out, lse;
  std::optional<at::Tensor> kv_lens, block_table, q_block_ids, k_block_ids, bits, bias;
  std::optional<at::Tensor> token_info, scale_hw, tile_map, q_scale;  // fastar.scale_attention
  AttentionParams prm;
};

inline at::Tensor checked_index_tensor(const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& q) {
  constexpr const char* op = "fastar.attention";
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
  check_same_device(op, name, t, q);
  return t.contiguous();
}

inline AttentionLaunch prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& kv_lens,
                                         const std::optional<at::Tensor>& block_table,
                                         const std::optional<at::Tensor>& q_block_ids,
                                         const std::optional<at::Tensor>& k_block_ids,
                                         const std::optional<at::Tensor>& mask_bits, const std::optional<at::Tensor>& bias,
                                         at::IntArrayRef mask_config, double scale) {
  constexpr const char* op = "fastar.attention";
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k and v must be 4-D [B, H, L, D], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k and v must have the same dtype, got ", st,
                   ", ", k.scalar_type(), ", ", v.scalar_type());
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);
  TORCH_CHECK_VALUE(mask_config.size() == kMaskConfigSize, op, ": mask_config must hold ", kMaskConfigSize, " values");

  AttentionLaunch l;
  l.q = unit_last_stride(q);
  l.k = unit_last_stride(k);
  l.v = unit_last_stride(v);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK_VALUE(k.size(3) == D && v.size(3) == D, op, ": q, k and v must have the same head dim, got ", D, ", ",
                    k.size(3), ", ", v.size(3));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, op, ": the number of query heads (", Hq,
                    ") must be a multiple of the number of key/value heads (", Hkv, ")");
  int64_t Lk = k.size(2);
  AttentionParams& p = l.prm;
  p = AttentionParams{};
  p.mask.scale_window = -1;
  if (block_table) {
    l.block_table = checked_index_tensor("block_table", *block_table, 2, q);
    TORCH_CHECK_VALUE(l.block_table->size(0) == B, op, ": block_table must have shape [B, max_pages] with B=", B,
                      ", got ", l.block_table->sizes());
    p.block_table = l.block_table->data_ptr<int32_t>();
    p.bt_sb = l.block_table->stride(0);
    p.page_size = k.size(2);
    Lk = l.block_table->size(1) * p.page_size;
    if (l.block_table->is_cpu() && l.block_table->numel()) {
      const int32_t* t = p.block_table;
      for (int64_t i = 0; i < l.block_table->numel(); ++i)
        TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < k.size(0), op, ": block_table holds page ", t[i], " outside [0, ",
                          k.size(0), ")");
    }
  } else {
    TORCH_CHECK_VALUE(k.size(0) == B, op, ": q and k must have the same batch size, got ", B, " and ", k.size(0));
  }
  if (kv_lens) {
    l.kv_lens = checked_index_tensor("kv_lens", *kv_lens, 1, q);
    TORCH_CHECK_VALUE(l.kv_lens->size(0) == B, op, ": kv_lens must have shape [B] with B=", B, ", got ",
                      l.kv_lens->sizes());
    p.kv_lens = l.kv_lens->data_ptr<int32_t>();
    if (l.kv_lens->is_cpu()) {
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK_VALUE(p.kv_lens[b] >= 0 && p.kv_lens[b] <= Lk, op, ": kv length ", p.kv_lens[b], " of sequence ", b,
                          " is outside [0, ", Lk, "]");
    }
  }

  AttentionMask& m = p.mask;
  m.causal = mask_config[0] != 0;
  m.bottom_right = mask_config[1] != 0;
  m.window = mask_config[2] != 0;
  m.window_left = mask_config[3];
  m.window_sinks = mask_config[4];
  TORCH_CHECK_VALUE(mask_config[5] >= 0 && mask_config[5] <= 3, op, ": unknown block relation ", mask_config[5]);
  m.block = static_cast<BlockRelation>(mask_config[5]);
  m.bits_cols = mask_config[6];
  TORCH_CHECK_VALUE(m.window_left >= 0 && m.window_sinks >= 0, op, ": window sizes must be non-negative");
  auto batch_stride = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.size(0) == B || t.size(0) == 1, op, ": ", name, " must have batch size ", B, " or 1, got ",
                      t.size(0));
    return t.size(0) == 1 ? int64_t{0} : t.stride(0);
  };
  if (m.block != BlockRelation::kNone) {
    TORCH_CHECK_VALUE(q_block_ids && k_block_ids, op, ": a block relation needs q_block_ids and k_block_ids");
    l.q_block_ids = checked_index_tensor("q_block_ids", *q_block_ids, 2, q);
    l.k_block_ids = checked_index_tensor("k_block_ids", *k_block_ids, 2, q);
    TORCH_CHECK_VALUE(l.q_block_ids->size(1) == Lq, op, ": q_block_ids must have ", Lq, " columns, got ",
                      l.q_block_ids->sizes());
    TORCH_CHECK_VALUE(l.k_block_ids->size(1) == Lk, op, ": k_block_ids must have ", Lk, " columns, got ",
                      l.k_block_ids->sizes());
    m.q_block_ids = l.q_block_ids->data_ptr<int32_t>();
    m.k_block_ids = l.k_block_ids->data_ptr<int32_t>();
    m.q_block_sb = batch_stride(*l.q_block_ids, "q_block_ids");
    m.k_block_sb = batch_stride(*l.k_block_ids, "k_block_ids");
  }
  if (mask_bits) {
    TORCH_CHECK_TYPE(mask_bits->scalar_type() == at::kByte, op, ": mask_bits must be uint8, got ",
                     mask_bits->scalar_type());
    TORCH_CHECK_VALUE(mask_bits->dim() == 3, op, ": mask_bits must be 3-D [B or 1, Lq, bytes], got ",
                      mask_bits->sizes());
    check_same_device(op, "mask_bits", *mask_bits, q);
    TORCH_CHECK_VALUE(m.bits_cols >= 0 && m.bits_cols <= Lk, op, ": the bit-packed mask covers ", m.bits_cols,
                      " keys, more than the ", Lk, " keys");
    TORCH_CHECK_VALUE(mask_bits->size(1) == Lq && mask_bits->size(2) == (m.bits_cols + 7) / 8, op,
                      ": mask_bits must have shape [B or 1, ", Lq, ", ", (m.bits_cols + 7) / 8, "], got ",
                      mask_bits->sizes());
    l.bits = mask_bits->contiguous();
    m.bits = l.bits->data_ptr<uint8_t>();
    m.bits_sb = batch_stride(*l.bits, "mask_bits");
    m.bits_row = l.bits->size(2);
  }
  if (bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == st, op, ": bias must have the dtype of q (", st, "), got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 4 && (bias->size(0) == B || bias->size(0) == 1) &&
                          (bias->size(1) == Hq || bias->size(1) == 1) && bias->size(2) == Lq && bias->size(3) == Lk,
                      op, ": bias must have shape [B or 1, H or 1, Lq, Lk] = [", B, ", ", Hq, ", ", Lq, ", ", Lk,
                      "], got ", bias->sizes());
    check_same_device(op, "bias", *bias, q);
    l.bias = unit_last_stride(*bias);
    m.bias = l.bias->data_ptr();
    m.bias_sb = l.bias->size(0) == 1 ? 0 : l.bias->stride(0);
    m.bias_sh = l.bias->size(1) == 1 ? 0 : l.bias->stride(1);
    m.bias_sq = l.bias->stride(2);
  }

  l.out = at::empty({B, Hq, Lq, D}, q.options());
  l.lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  p.q = l.q.data_ptr();
  p.k = l.k.data_ptr();
  p.v = l.v.data_ptr();
  p.out = l.out.data_ptr();
  p.lse = l.lse.data_ptr<float>();
  p.q_sb = l.q.stride(0);
  p.q_sh = l.q.stride(1);
  p.q_sl = l.q.stride(2);
  p.k_sb = l.k.stride(0);
  p.k_sh = l.k.stride(1);
  p.k_sl = l.k.stride(2);
  p.v_sb = l.v.stride(0);
  p.v_sh = l.v.stride(1);
  p.v_sl = l.v.stride(2);
  p.o_sb = l.out.stride(0);
  p.o_sh = l.out.stride(1);
  p.o_sl = l.out.stride(2);
  p.num_pages = block_table ? k.size(0) : 0;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.scale = static_cast<float>(scale);
  return l;
}

// Runs the prepared kernel arguments on each backend (cpu/attention.cpp, cuda/attention_glue.cpp); shared
// by fastar.attention and fastar.scale_attention. `op` names the caller in error messages.
void run_attention_cpu(const AttentionLaunch& l);
void run_attention_cuda(const AttentionLaunch& l, const char* op);

}  // namespace fastar
