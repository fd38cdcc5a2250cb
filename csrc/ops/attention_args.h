// Argument checks, output allocation and kernel arguments of fastar.attention, shared by every backend.
#pragma once
#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/attention.h"
#include "ops/common.h"

namespace fastar {

// The keyword arguments of the attention op, in its schema's order (csrc/schemas.h says what each means).
struct AttentionArgs {
  std::optional<at::Tensor> kv_lens, block_table;
  bool causal = false;
  bool bottom_right = true;
  int64_t window_left = -1;
  int64_t window_sinks = 0;
  c10::string_view block_relation = "none";
  std::optional<at::Tensor> q_block_ids, k_block_ids, mask_bits;
  int64_t mask_bits_cols = 0;
  std::optional<at::Tensor> bias;
  std::optional<at::Tensor> k_scale, v_scale;  // quantized k and v (int8 / fp8 codes; KIVI's float16 scales)
  std::optional<at::Tensor> k_zero, v_zero, k_window, v_window, kivi_split;  // KIVI (kivi_group > 0)
  int64_t kivi_group = 0;
};

// The kernel writes `out`, the caller's tensor, or a temporary copied into `out_target` by finish_attention.
struct AttentionLaunch {
  at::Tensor q, k, v, out, lse;
  std::optional<at::Tensor> out_target;
  std::optional<at::Tensor> kv_lens, block_table, q_block_ids, k_block_ids, bits, bias, k_scale, v_scale;
  std::optional<at::Tensor> k_zero, v_zero, k_window, v_window, kivi_split;
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

inline BlockRelation parse_block_relation(const char* op, const char* name, c10::string_view s) {
  if (s == "none") return BlockRelation::kNone;
  if (s == "causal") return BlockRelation::kCausal;
  if (s == "same") return BlockRelation::kSame;
  TORCH_CHECK_VALUE(s == "prev", op, ": ", name, " must be \"none\", \"causal\", \"same\" or \"prev\", got \"",
                    std::string(s), "\"");
  return BlockRelation::kPrev;
}

// Whether out and t may share memory: raises where they surely do (the same view, or both dense with byte
// ranges meeting); true where they might (same storage, byte ranges meeting), false where they cannot.
inline bool out_may_overlap(const char* op, const at::Tensor& out, const char* name, const at::Tensor& t) {
  if (out.numel() == 0 || t.numel() == 0 || !out.storage().is_alias_of(t.storage())) return false;
  auto range = [](const at::Tensor& x) {
    int64_t span = 1;
    for (int64_t d = 0; d < x.dim(); ++d) span += (x.size(d) - 1) * x.stride(d);
    const char* begin = static_cast<const char*>(x.data_ptr());
    return std::make_pair(begin, begin + span * x.element_size());
  };
  const auto [ob, oe] = range(out);
  const auto [tb, te] = range(t);
  if (ob >= te || tb >= oe) return false;
  const bool same_view = ob == tb && out.strides() == t.strides();
  TORCH_CHECK_VALUE(!same_view && !(out.is_non_overlapping_and_dense() && t.is_non_overlapping_and_dense()), op,
                    ": out shares memory with ", name);
  return true;
}

// KIVI's arguments (AttentionParams' kivi_* fields): packed uint8 codes, float16 scales and zeros, the windows in
// q's dtype, the per-sequence split.
inline void prepare_kivi(AttentionLaunch& l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const AttentionArgs& a) {
  constexpr const char* op = "fastar.attention";
  AttentionParams& p = l.prm;
  const int64_t B = q.size(0), D = q.size(3), Hkv = k.size(1), bytes = k.size(3), G = a.kivi_group;
  TORCH_CHECK_VALUE(a.k_scale && a.v_scale && a.k_zero && a.v_zero && a.k_window && a.v_window && a.kivi_split, op,
                    ": a KIVI cache needs k_scale, v_scale, k_zero, v_zero, k_window, v_window and kivi_split");
  TORCH_CHECK_TYPE(k.scalar_type() == at::kByte, op, ": KIVI k and v must be uint8 packed codes, got ",
                   k.scalar_type());
  TORCH_CHECK_VALUE(bytes * 8 == 4 * D || bytes * 8 == 2 * D, op, ": KIVI codes must have head_dim / 2 (int4) or ",
                    "head_dim / 4 (int2) bytes per row, got ", bytes, " for head dim ", D);
  TORCH_CHECK_VALUE(D % G == 0, op, ": kivi_group (", G, ") must divide the head dim ", D);
  for (const at::Tensor* c : {&k, &v}) {  // [B or pages, Hkv, S, bytes] views of [.., S, Hkv, bytes] storage
    TORCH_CHECK_VALUE(c->stride(3) == 1 && c->stride(1) == bytes && c->stride(2) == Hkv * bytes &&
                          c->stride(0) == c->size(2) * Hkv * bytes,
                      op, ": KIVI codes must be transposed views of contiguous [.., S, Hkv, bytes] storage");
  }
  const int64_t slots = k.size(0) * k.size(2);
  TORCH_CHECK_VALUE(slots % G == 0, op, ": the cache's ", slots, " slots are not whole groups of ", G);
  const std::pair<const char*, std::vector<int64_t>> meta[] = {{"k_scale", {slots / G, Hkv, D}},
                                                               {"k_zero", {slots / G, Hkv, D}},
                                                               {"v_scale", {slots, Hkv, D / G}},
                                                               {"v_zero", {slots, Hkv, D / G}}};
  std::optional<at::Tensor>* kept[] = {&l.k_scale, &l.k_zero, &l.v_scale, &l.v_zero};
  const std::optional<at::Tensor>* given[] = {&a.k_scale, &a.k_zero, &a.v_scale, &a.v_zero};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = **given[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf, op, ": KIVI ", meta[i].first, " must be float16, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == meta[i].second, op, ": KIVI ", meta[i].first, " must be ",
                      at::IntArrayRef(meta[i].second), ", got ", t.sizes());
    check_same_device(op, meta[i].first, t, q);
    *kept[i] = t.contiguous();
  }
  for (const auto& [name, w, keep] :
       {std::tuple{"k_window", &*a.k_window, &l.k_window}, std::tuple{"v_window", &*a.v_window, &l.v_window}}) {
    TORCH_CHECK_VALUE(w->dim() == 4 && w->size(0) == B && w->size(1) > 0 && w->size(2) == Hkv && w->size(3) == D &&
                          w->sizes() == a.k_window->sizes(),
                      op, ": KIVI ", name, " must be [B, window, Hkv, D] = [", B, ", window, ", Hkv, ", ", D,
                      "] like k_window, got ", w->sizes());
    TORCH_CHECK_TYPE(w->scalar_type() == q.scalar_type(), op, ": KIVI ", name, " must have q's dtype ", q.scalar_type(),
                     ", got ", w->scalar_type());
    check_same_device(op, name, *w, q);
    *keep = w->contiguous();
  }
  l.kivi_split = checked_index_tensor("kivi_split", *a.kivi_split, 2, q);
  TORCH_CHECK_VALUE(l.kivi_split->size(0) == B && l.kivi_split->size(1) == 2, op, ": kivi_split must be [", B,
                    ", 2], got ", l.kivi_split->sizes());
  if (l.kivi_split->is_cpu()) {  // on a GPU the values would cost a sync: QuantizedKVCache keeps them valid
    const int32_t* split = l.kivi_split->data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(split[2 * b] >= 0 && split[2 * b] % G == 0 && split[2 * b + 1] >= 0, op, ": kivi_split[", b,
                        "] = (", split[2 * b], ", ", split[2 * b + 1],
                        "): keys are quantized a group at a time, so their count must be a multiple of kivi_group = ",
                        G, ", and both counts >= 0");
  }
  p.kv_quantized = true;
  p.kivi_bits = static_cast<int>(bytes * 8 / D);
  p.kivi_group = G;
  p.kivi_window_len = l.k_window->size(1);
  p.kivi_k_scale = static_cast<const uint16_t*>(l.k_scale->data_ptr());
  p.kivi_k_zero = static_cast<const uint16_t*>(l.k_zero->data_ptr());
  p.kivi_v_scale = static_cast<const uint16_t*>(l.v_scale->data_ptr());
  p.kivi_v_zero = static_cast<const uint16_t*>(l.v_zero->data_ptr());
  p.kivi_k_window = l.k_window->data_ptr();
  p.kivi_v_window = l.v_window->data_ptr();
  p.kivi_split = l.kivi_split->data_ptr<int32_t>();
}

// Checks and kernel arguments of everything but `out` (bind_out).
inline AttentionLaunch prepare_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, const AttentionArgs& a) {
  constexpr const char* op = "fastar.attention";
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k and v must be 4-D [B, H, L, D], got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": q must be float32, float16 or bfloat16, got ", st);
  const bool quantized = a.k_scale.has_value() || a.v_scale.has_value();
  const bool kivi = a.kivi_group > 0;
  TORCH_CHECK_VALUE(kivi || !(a.k_zero || a.v_zero || a.k_window || a.v_window || a.kivi_split), op,
                    ": k_zero, v_zero, k_window, v_window and kivi_split describe a KIVI cache: give kivi_group > 0");
  if (quantized) {
    TORCH_CHECK_VALUE(a.k_scale && a.v_scale, op, ": give both k_scale and v_scale for a quantized cache");
    TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), op, ": k and v must have the same dtype, got ",
                     k.scalar_type(), " and ", v.scalar_type());
  } else {
    TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, op,
                     ": q, k and v must have the same dtype (or int8 / fp8 k and v with k_scale and v_scale), got ", st,
                     ", ", k.scalar_type(), ", ", v.scalar_type());
  }
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);

  AttentionLaunch l;
  l.q = unit_last_stride(q);
  l.k = unit_last_stride(k);
  l.v = unit_last_stride(v);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1);
  if (!kivi)
    TORCH_CHECK_VALUE(k.size(3) == D && v.size(3) == D, op, ": q, k and v must have the same head dim, got ", D, ", ",
                      k.size(3), ", ", v.size(3));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, op, ": the number of query heads (", Hq,
                    ") must be a multiple of the number of key/value heads (", Hkv, ")");
  int64_t Lk = k.size(2);
  AttentionParams& p = l.prm;
  p = AttentionParams{};
  p.mask.scale_window = -1;
  if (a.block_table) {
    l.block_table = checked_index_tensor("block_table", *a.block_table, 2, q);
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
  if (a.kv_lens) {
    l.kv_lens = checked_index_tensor("kv_lens", *a.kv_lens, 1, q);
    TORCH_CHECK_VALUE(l.kv_lens->size(0) == B, op, ": kv_lens must have shape [B] with B=", B, ", got ",
                      l.kv_lens->sizes());
    p.kv_lens = l.kv_lens->data_ptr<int32_t>();
    if (l.kv_lens->is_cpu()) {
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK_VALUE(p.kv_lens[b] >= 0 && p.kv_lens[b] <= Lk, op, ": kv length ", p.kv_lens[b], " of sequence ", b,
                          " is outside [0, ", Lk, "]");
    }
  }

  if (kivi) {
    prepare_kivi(l, q, k, v, a);
  } else if (quantized) {  // one scale per K / V row of k's layout, broadcast (zero strides) where shared
    p.kv_quantized = true;
    p.kv_format = kv_format_of(op, k);
    const auto rows = k.sizes().slice(0, 3);
    const std::pair<const at::Tensor*, std::optional<at::Tensor>*> scales[] = {{&*a.k_scale, &l.k_scale},
                                                                               {&*a.v_scale, &l.v_scale}};
    for (const auto& [given, kept] : scales) {
      const char* name = given == &*a.k_scale ? "k_scale" : "v_scale";
      TORCH_CHECK_TYPE(given->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                       given->scalar_type());
      check_same_device(op, name, *given, q);
      TORCH_CHECK_VALUE(given->dim() <= 3 && at::is_expandable_to(given->sizes(), rows), op, ": ", name,
                        " must broadcast to k's rows ", rows,
                        " (one scale per key row, [1, Hkv, 1] per kv head, or one),", " got shape ", given->sizes());
      *kept = given->expand(rows);
    }
    p.k_scale = l.k_scale->data_ptr<float>();
    p.v_scale = l.v_scale->data_ptr<float>();
    p.ks_sb = l.k_scale->stride(0), p.ks_sh = l.k_scale->stride(1), p.ks_sl = l.k_scale->stride(2);
    p.vs_sb = l.v_scale->stride(0), p.vs_sh = l.v_scale->stride(1), p.vs_sl = l.v_scale->stride(2);
  }

  AttentionMask& m = p.mask;
  m.causal = a.causal;
  m.bottom_right = a.bottom_right;
  TORCH_CHECK_VALUE(a.window_left >= -1 && a.window_sinks >= 0, op,
                    ": window_left must be >= 0 (or -1 = no window) and window_sinks >= 0, got ", a.window_left,
                    " and ", a.window_sinks);
  m.window = a.window_left >= 0;
  m.window_left = m.window ? a.window_left : 0;
  m.window_sinks = a.window_sinks;
  m.block = parse_block_relation(op, "block_relation", a.block_relation);
  m.bits_cols = a.mask_bits_cols;
  auto batch_stride = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.size(0) == B || t.size(0) == 1, op, ": ", name, " must have batch size ", B, " or 1, got ",
                      t.size(0));
    return t.size(0) == 1 ? int64_t{0} : t.stride(0);
  };
  if (m.block != BlockRelation::kNone) {
    TORCH_CHECK_VALUE(a.q_block_ids && a.k_block_ids, op, ": a block relation needs q_block_ids and k_block_ids");
    l.q_block_ids = checked_index_tensor("q_block_ids", *a.q_block_ids, 2, q);
    l.k_block_ids = checked_index_tensor("k_block_ids", *a.k_block_ids, 2, q);
    TORCH_CHECK_VALUE(l.q_block_ids->size(1) == Lq, op, ": q_block_ids must have ", Lq, " columns, got ",
                      l.q_block_ids->sizes());
    TORCH_CHECK_VALUE(l.k_block_ids->size(1) == Lk, op, ": k_block_ids must have ", Lk, " columns, got ",
                      l.k_block_ids->sizes());
    m.q_block_ids = l.q_block_ids->data_ptr<int32_t>();
    m.k_block_ids = l.k_block_ids->data_ptr<int32_t>();
    m.q_block_sb = batch_stride(*l.q_block_ids, "q_block_ids");
    m.k_block_sb = batch_stride(*l.k_block_ids, "k_block_ids");
  }
  if (a.mask_bits) {
    TORCH_CHECK_TYPE(a.mask_bits->scalar_type() == at::kByte, op, ": mask_bits must be uint8, got ",
                     a.mask_bits->scalar_type());
    TORCH_CHECK_VALUE(a.mask_bits->dim() == 3, op, ": mask_bits must be 3-D [B or 1, Lq, bytes], got ",
                      a.mask_bits->sizes());
    check_same_device(op, "mask_bits", *a.mask_bits, q);
    TORCH_CHECK_VALUE(m.bits_cols >= 0 && m.bits_cols <= Lk, op, ": the bit-packed mask covers ", m.bits_cols,
                      " keys, more than the ", Lk, " keys");
    TORCH_CHECK_VALUE(a.mask_bits->size(1) == Lq && a.mask_bits->size(2) == (m.bits_cols + 7) / 8, op,
                      ": mask_bits must have shape [B or 1, ", Lq, ", ", (m.bits_cols + 7) / 8, "], got ",
                      a.mask_bits->sizes());
    l.bits = a.mask_bits->contiguous();
    m.bits = l.bits->data_ptr<uint8_t>();
    m.bits_sb = batch_stride(*l.bits, "mask_bits");
    m.bits_row = l.bits->size(2);
  }
  if (a.bias) {
    TORCH_CHECK_TYPE(a.bias->scalar_type() == st, op, ": bias must have the dtype of q (", st, "), got ",
                     a.bias->scalar_type());
    TORCH_CHECK_VALUE(a.bias->dim() == 4 && (a.bias->size(0) == B || a.bias->size(0) == 1) &&
                          (a.bias->size(1) == Hq || a.bias->size(1) == 1) && a.bias->size(2) == Lq &&
                          a.bias->size(3) == Lk,
                      op, ": bias must have shape [B or 1, H or 1, Lq, Lk] = [", B, ", ", Hq, ", ", Lq, ", ", Lk,
                      "], got ", a.bias->sizes());
    check_same_device(op, "bias", *a.bias, q);
    l.bias = unit_last_stride(*a.bias);
    m.bias = l.bias->data_ptr();
    m.bias_sb = l.bias->size(0) == 1 ? 0 : l.bias->stride(0);
    m.bias_sh = l.bias->size(1) == 1 ? 0 : l.bias->stride(1);
    m.bias_sq = l.bias->stride(2);
  }

  l.lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  p.q = l.q.data_ptr();
  p.k = l.k.data_ptr();
  p.v = l.v.data_ptr();
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
  p.num_pages = a.block_table ? k.size(0) : 0;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lq = Lq;
  p.Lk = Lk;
  p.D = D;
  p.scale = static_cast<float>(scale);
  return l;
}

// out: [B, Hq, Lq, D] of q's dtype and device, no element twice, no memory shared with an input the kernel
// reads. The kernel writes it in place, or (a non-unit last stride, or memory it may share with an input) a
// temporary that finish_attention copies into it.
inline void bind_out(AttentionLaunch& l, const at::Tensor& out, const char* op) {
  const at::Tensor& q = l.q;
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), op, ": out must have the dtype of q (", q.scalar_type(),
                   "), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == q.device(), op, ": out is on ", out.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), op, ": out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": out has elements that share memory (an expanded tensor)");
  bool temporary = out.numel() > 0 && out.size(3) > 1 && out.stride(3) != 1;
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &l.q}, {"k", &l.k}, {"v", &l.v}};
  for (const auto& [name, t] : inputs) temporary |= out_may_overlap(op, out, name, *t);
  const std::pair<const char*, const std::optional<at::Tensor>*> optional_inputs[] = {
      {"kv_lens", &l.kv_lens},         {"block_table", &l.block_table}, {"q_block_ids", &l.q_block_ids},
      {"k_block_ids", &l.k_block_ids}, {"mask_bits", &l.bits},          {"bias", &l.bias},
      {"token_info", &l.token_info},   {"scale_hw", &l.scale_hw},       {"tile_map", &l.tile_map},
      {"q_scale", &l.q_scale}};
  for (const auto& [name, t] : optional_inputs) temporary |= t->has_value() && out_may_overlap(op, out, name, **t);
  if (temporary) {
    l.out = at::empty(out.sizes(), out.options());
    l.out_target = out;
  } else {
    l.out = out;
  }
  AttentionParams& p = l.prm;
  p.out = l.out.data_ptr();
  p.o_sb = l.out.stride(0);
  p.o_sh = l.out.stride(1);
  p.o_sl = l.out.stride(2);
}

inline AttentionLaunch prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& out, double scale, const AttentionArgs& a) {
  AttentionLaunch l = prepare_attention_inputs(q, k, v, scale, a);
  bind_out(l, out, "fastar.attention");
  return l;
}

// After the kernel: the temporary (if any) copied into out; returns the LSE.
inline at::Tensor finish_attention(const AttentionLaunch& l) {
  if (l.out_target) l.out_target->copy_(l.out);
  return l.lse;
}

// Runs the prepared kernel arguments on a backend (cpu/attention.cpp, cuda/attention_glue.cpp); shared by
// fastar.attention and fastar.scale_attention. `op` names the caller in error messages.
void run_attention_cpu(const AttentionLaunch& l, const char* op);
void run_attention_cuda(const AttentionLaunch& l, const char* op);

// The op as its schema declares it (csrc/schemas.h); Run is run_attention_cpu or run_attention_cuda.
template <void (*Run)(const AttentionLaunch&, const char*)>
at::Tensor attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                        double scale, const std::optional<at::Tensor>& kv_lens,
                        const std::optional<at::Tensor>& block_table, bool causal, bool bottom_right,
                        int64_t window_left, int64_t window_sinks, c10::string_view block_relation,
                        const std::optional<at::Tensor>& q_block_ids, const std::optional<at::Tensor>& k_block_ids,
                        const std::optional<at::Tensor>& mask_bits, int64_t mask_bits_cols,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_zero,
                        const std::optional<at::Tensor>& v_zero, const std::optional<at::Tensor>& k_window,
                        const std::optional<at::Tensor>& v_window, const std::optional<at::Tensor>& kivi_split,
                        int64_t kivi_group) {
  const AttentionArgs args{kv_lens,        block_table,    causal,      bottom_right, window_left,
                           window_sinks,   block_relation, q_block_ids, k_block_ids,  mask_bits,
                           mask_bits_cols, bias,           k_scale,     v_scale,      k_zero,
                           v_zero,         k_window,       v_window,    kivi_split,   kivi_group};
  AttentionLaunch l = prepare_attention(q, k, v, out, scale, args);
  Run(l, "fastar.attention");
  return finish_attention(l);
}

}  // namespace fastar
