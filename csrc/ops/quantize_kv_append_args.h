// fastar.quantize_kv_append: argument checks and the kernel parameters (core/kv_quant.h), shared by the CPU and
// CUDA glue. Value checks (slot ids in range, finite K/V) are the kernels' business: the CPU raises, CUDA skips
// an out-of-range slot and marks a non-finite row NaN (docs/quantized_kvcache.md).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "core/kv_quant.h"
#include "ops/common.h"

namespace fastar {

struct QuantizeKvLaunch {
  at::Tensor key, value;
  QuantizeKvParams prm;
};

inline QuantizeKvLaunch prepare_quantize_kv_append(const at::Tensor& key, const at::Tensor& value,
                                                   const at::Tensor& slot_mapping, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache, const at::Tensor& k_scale,
                                                   const at::Tensor& v_scale) {
  constexpr const char* op = "fastar.quantize_kv_append";
  check_float_dtype(op, "key", key);
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), op, ": value must have key's dtype ", key.scalar_type(),
                   ", got ", value.scalar_type());
  TORCH_CHECK_VALUE(key.dim() == 3, op, ": key must be [num_tokens, kv_heads, head_dim], got shape ", key.sizes());
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), op, ": value must have key's shape ", key.sizes(), ", got ",
                    value.sizes());
  const int64_t N = key.size(0), Hkv = key.size(1), D = key.size(2);
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == N, op, ": slot_mapping must be [", N,
                    "] (one slot per token), got shape ", slot_mapping.sizes());
  const KvFormat format = kv_format_of(op, k_cache);
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have k_cache's dtype ",
                   k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.dim() >= 3 && k_cache.size(-2) == Hkv && k_cache.size(-1) == D, op,
                    ": k_cache must be [num_slots, ", Hkv, ", ", D, "] or [num_pages, page_size, ", Hkv, ", ", D,
                    "], got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() <= 4 && v_cache.sizes() == k_cache.sizes(), op,
                    ": v_cache must have k_cache's shape ", k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  const int64_t num_slots = Hkv * D > 0 ? k_cache.numel() / (Hkv * D) : 0;
  const auto slot_dims = k_cache.sizes().slice(0, k_cache.dim() - 1);  // [num_slots, Hkv] or [pages, size, Hkv]
  const bool per_token = format == KvFormat::kInt8 || k_scale.dim() == k_cache.dim() - 1;
  for (const at::Tensor* s : {&k_scale, &v_scale}) {
    const char* name = s == &k_scale ? "k_scale" : "v_scale";
    TORCH_CHECK_TYPE(s->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", s->scalar_type());
    if (per_token) {
      TORCH_CHECK_VALUE(s->sizes() == slot_dims && s->is_contiguous(), op, ": ", name, " must be a contiguous float32 ",
                        slot_dims, " (one scale per slot and kv head), got shape ", s->sizes());
    } else {
      TORCH_CHECK_VALUE(s->numel() == 1 || (s->dim() == 1 && s->size(0) == Hkv), op, ": ", name,
                        " must hold one scale, one per kv head [", Hkv, "], or one per slot and kv head ", slot_dims,
                        ", got shape ", s->sizes());
    }
  }
  TORCH_CHECK_VALUE(per_token || v_scale.numel() == k_scale.numel(), op,
                    ": k_scale and v_scale must be both per tensor or both per kv head");
  check_same_device(op, "value", value, key);
  check_same_device(op, "slot_mapping", slot_mapping, key);
  check_same_device(op, "k_cache", k_cache, key);
  check_same_device(op, "v_cache", v_cache, key);
  check_same_device(op, "k_scale", k_scale, key);
  check_same_device(op, "v_scale", v_scale, key);

  QuantizeKvLaunch l;
  l.key = unit_last_stride(key);
  l.value = unit_last_stride(value);
  QuantizeKvParams& p = l.prm;
  p = QuantizeKvParams{};
  p.key = l.key.data_ptr();
  p.value = l.value.data_ptr();
  p.k_sn = l.key.stride(0);
  p.k_sh = l.key.stride(1);
  p.v_sn = l.value.stride(0);
  p.v_sh = l.value.stride(1);
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.N = N;
  p.Hkv = Hkv;
  p.D = D;
  p.num_slots = num_slots;
  p.k_cache = static_cast<uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<uint8_t*>(v_cache.data_ptr());
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.per_token_scale = per_token;
  p.scale_per_head = !per_token && k_scale.numel() == Hkv && Hkv > 1;
  p.format = format;
  return l;
}

// The op as its schema declares it (csrc/schemas.h); Run is run_quantize_kv_append_cpu (cpu/quantize_kv_append.cpp)
// or run_quantize_kv_append_cuda (cuda/quantize_kv_append_glue.cpp).
void run_quantize_kv_append_cpu(QuantizeKvLaunch& l);
void run_quantize_kv_append_cuda(QuantizeKvLaunch& l);

template <void (*Run)(QuantizeKvLaunch&)>
void quantize_kv_append_op(const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_scale,
                           const at::Tensor& v_scale) {
  QuantizeKvLaunch l = prepare_quantize_kv_append(key, value, slot_mapping, k_cache, v_cache, k_scale, v_scale);
  if (l.prm.N > 0 && l.prm.Hkv > 0 && l.prm.D > 0) Run(l);
}

}  // namespace fastar
