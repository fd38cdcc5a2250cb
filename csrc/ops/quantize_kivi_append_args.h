// fastar.quantize_kivi_append: argument checks and the kernel parameters (core/kivi_quant.h), shared by the CPU
// and CUDA glue. Value checks (group and slot ids in range, K/V finite and within float16's range) are the
// kernels' business: the CPU raises, CUDA skips an out-of-range id and marks a non-finite group NaN.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

#include "core/kivi_quant.h"
#include "ops/common.h"

namespace fastar {

struct KiviAppendLaunch {
  at::Tensor key, value;
  KiviAppendParams prm;
};

inline KiviAppendLaunch prepare_quantize_kivi_append(const at::Tensor& key, const at::Tensor& value,
                                                     const at::Tensor& key_groups, const at::Tensor& value_slots,
                                                     const at::Tensor& k_codes, const at::Tensor& v_codes,
                                                     const at::Tensor& k_scale, const at::Tensor& k_zero,
                                                     const at::Tensor& v_scale, const at::Tensor& v_zero,
                                                     int64_t group_size) {
  constexpr const char* op = "fastar.quantize_kivi_append";
  check_float_dtype(op, "key", key);
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), op, ": value must have key's dtype ", key.scalar_type(),
                   ", got ", value.scalar_type());
  TORCH_CHECK_VALUE(key.dim() == 3 && value.dim() == 3, op,
                    ": key and value must be [num_tokens, kv_heads, head_dim], got shapes ", key.sizes(), " and ",
                    value.sizes());
  const int64_t Hkv = key.size(1), D = key.size(2), G = group_size;
  TORCH_CHECK_VALUE(value.size(1) == Hkv && value.size(2) == D, op, ": value must be [num_tokens, ", Hkv, ", ", D,
                    "] like key, got ", value.sizes());
  TORCH_CHECK_VALUE(G >= 1 && D % G == 0, op, ": group_size (", G, ") must divide the head dim ", D,
                    " (values are grouped along it)");
  TORCH_CHECK_VALUE(key.size(0) % G == 0, op, ": key holds ", key.size(0),
                    " rows, not a whole number of groups of group_size = ", G);
  for (const at::Tensor* ids : {&key_groups, &value_slots}) {
    const char* name = ids == &key_groups ? "key_groups" : "value_slots";
    const int64_t n = ids == &key_groups ? key.size(0) / G : value.size(0);
    TORCH_CHECK_TYPE(ids->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", ids->scalar_type());
    TORCH_CHECK_VALUE(ids->dim() == 1 && ids->size(0) == n, op, ": ", name, " must be [", n, "], got shape ",
                      ids->sizes());
  }
  TORCH_CHECK_TYPE(k_codes.scalar_type() == at::kByte && v_codes.scalar_type() == at::kByte, op,
                   ": k_codes and v_codes must be uint8 (packed codes), got ", k_codes.scalar_type(), " and ",
                   v_codes.scalar_type());
  TORCH_CHECK_VALUE(k_codes.dim() == 3 && k_codes.size(1) == Hkv && k_codes.sizes() == v_codes.sizes(), op,
                    ": k_codes and v_codes must both be [num_slots, ", Hkv, ", head_dim * bits / 8], got ",
                    k_codes.sizes(), " and ", v_codes.sizes());
  const int64_t bytes = k_codes.size(2);
  TORCH_CHECK_VALUE(D > 0 && (bytes * 8 == 4 * D || bytes * 8 == 2 * D), op, ": the codes' last dim must be ",
                    "head_dim / 2 (int4) or head_dim / 4 (int2) = ", D / 2, " or ", D / 4, ", got ", bytes);
  const int64_t bits = bytes * 8 / D;
  TORCH_CHECK_VALUE(G * bits % 8 == 0, op, ": group_size (", G, ") must fill whole bytes of ", bits,
                    "-bit codes: a multiple of ", 8 / bits);
  const int64_t num_slots = k_codes.size(0);
  TORCH_CHECK_VALUE(num_slots % G == 0, op, ": the cache's ", num_slots, " slots are not whole groups of ", G);
  TORCH_CHECK_VALUE(k_codes.is_contiguous() && v_codes.is_contiguous(), op, ": the codes must be contiguous");
  const std::vector<int64_t> key_meta{num_slots / G, Hkv, D}, value_meta{num_slots, Hkv, D / G};
  for (const at::Tensor* t : {&k_scale, &k_zero, &v_scale, &v_zero}) {
    const bool is_key = t == &k_scale || t == &k_zero;
    const char* name = t == &k_scale ? "k_scale" : t == &k_zero ? "k_zero" : t == &v_scale ? "v_scale" : "v_zero";
    TORCH_CHECK_TYPE(t->scalar_type() == at::kHalf, op, ": ", name, " must be float16, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == (is_key ? key_meta : value_meta) && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous float16 ", at::IntArrayRef(is_key ? key_meta : value_meta),
                      is_key ? " (per group of tokens and channel)" : " (per slot and group of channels)", ", got ",
                      t->sizes());
  }
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"value", &value},     {"key_groups", &key_groups}, {"value_slots", &value_slots},
      {"k_codes", &k_codes}, {"v_codes", &v_codes},       {"k_scale", &k_scale},
      {"k_zero", &k_zero},   {"v_scale", &v_scale},       {"v_zero", &v_zero}};
  for (const auto& [name, t] : others) check_same_device(op, name, *t, key);

  KiviAppendLaunch l;
  l.key = unit_last_stride(key);
  l.value = unit_last_stride(value);
  KiviAppendParams& p = l.prm;
  p = KiviAppendParams{};
  p.key = l.key.data_ptr();
  p.value = l.value.data_ptr();
  p.k_sn = l.key.stride(0);
  p.k_sh = l.key.stride(1);
  p.v_sn = l.value.stride(0);
  p.v_sh = l.value.stride(1);
  p.key_groups = key_groups.data_ptr<int64_t>();
  p.value_slots = value_slots.data_ptr<int64_t>();
  p.Nk = key.size(0);
  p.Nv = value.size(0);
  p.Hkv = Hkv;
  p.D = D;
  p.G = G;
  p.bits = bits;
  p.num_slots = num_slots;
  p.k_codes = k_codes.data_ptr<uint8_t>();
  p.v_codes = v_codes.data_ptr<uint8_t>();
  p.k_scale = static_cast<uint16_t*>(k_scale.data_ptr());
  p.k_zero = static_cast<uint16_t*>(k_zero.data_ptr());
  p.v_scale = static_cast<uint16_t*>(v_scale.data_ptr());
  p.v_zero = static_cast<uint16_t*>(v_zero.data_ptr());
  return l;
}

// The op as its schema declares it (csrc/schemas.h); Run is run_quantize_kivi_append_cpu
// (cpu/quantize_kivi_append.cpp) or run_quantize_kivi_append_cuda (cuda/quantize_kivi_append_glue.cpp).
void run_quantize_kivi_append_cpu(KiviAppendLaunch& l);
void run_quantize_kivi_append_cuda(KiviAppendLaunch& l);

template <void (*Run)(KiviAppendLaunch&)>
void quantize_kivi_append_op(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_groups,
                             const at::Tensor& value_slots, const at::Tensor& k_codes, const at::Tensor& v_codes,
                             const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_scale,
                             const at::Tensor& v_zero, int64_t group_size) {
  KiviAppendLaunch l = prepare_quantize_kivi_append(key, value, key_groups, value_slots, k_codes, v_codes, k_scale,
                                                    k_zero, v_scale, v_zero, group_size);
  if ((l.prm.Nk > 0 || l.prm.Nv > 0) && l.prm.Hkv > 0) Run(l);
}

}  // namespace fastar
