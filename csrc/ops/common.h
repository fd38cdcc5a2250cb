// Argument checks and conversions every op's glue uses (CPU and CUDA alike).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "core/dtype.h"
#include "core/kv_quant.h"

namespace fastar {

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
                    ref.device());
}

// A seed or offset of the Philox streams: one int64, on the CPU or on the device of ref.
inline void check_seed(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cpu() || t.device() == ref.device(), op, ": ", name, " must be on the CPU or on ",
                    ref.device(), ", got ", t.device());
}

// t itself when its last dimension has unit stride (the kernels' layout), else a contiguous copy.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline FloatKind float_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return FloatKind::kFloat16;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      return FloatKind::kFloat32;
  }
}

// The format of a quantized K/V cache from its dtype: int8, float8_e4m3fn or float8_e5m2.
inline KvFormat kv_format_of(const char* op, const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kChar:
      return KvFormat::kInt8;
    case at::kFloat8_e4m3fn:
      return KvFormat::kFp8E4M3;
    case at::kFloat8_e5m2:
      return KvFormat::kFp8E5M2;
    default:
      TORCH_CHECK_TYPE(false, op, ": the caches must be int8, float8_e4m3fn or float8_e5m2, got ", cache.scalar_type());
  }
}

}  // namespace fastar
