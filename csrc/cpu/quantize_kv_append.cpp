// fastar.quantize_kv_append on the CPU (ops/quantize_kv_append_args.h): slot ids and fixed scales are checked
// here, NaN / Inf by the kernel of the active ISA (cpu/kernels/quantize_kv_append.cpp); each raises before anything
// is written.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <string>

#include "cpu/kernels/quantize_kv_append.h"
#include "ops/quantize_kv_append_args.h"

namespace fastar {
namespace {

// The first non-finite element of a row the kernel flagged, as "key[n, h, d] is nan".
template <typename T>
std::string describe_bad_row(const QuantizeKvParams& p, int64_t r) {
  const int64_t n = r / 2 / p.Hkv, h = r / 2 % p.Hkv;
  const T* row = r % 2 ? static_cast<const T*>(p.value) + n * p.v_sn + h * p.v_sh
                       : static_cast<const T*>(p.key) + n * p.k_sn + h * p.k_sh;
  int64_t d = 0;
  while (d + 1 < p.D && std::isfinite(static_cast<float>(row[d]))) ++d;
  return std::string(r % 2 ? "value[" : "key[") + std::to_string(n) + ", " + std::to_string(h) + ", " +
         std::to_string(d) + "] is " + (std::isnan(static_cast<float>(row[d])) ? "nan" : "inf");
}

}  // namespace

void run_quantize_kv_append_cpu(QuantizeKvLaunch& l) {
  constexpr const char* op = "fastar.quantize_kv_append";
  TORCH_CHECK_VALUE(l.key.is_cpu(), op, ": expected CPU tensors");
  const QuantizeKvParams& p = l.prm;
  for (int64_t n = 0; n < p.N; ++n)
    TORCH_CHECK_INDEX(p.slots[n] >= -1 && p.slots[n] < p.num_slots, op, ": slot_mapping[", n, "] = ", p.slots[n],
                      " is outside [-1, ", p.num_slots, ") (-1 skips a token)");
  if (!p.per_token_scale) {
    const int64_t count = p.scale_per_head ? p.Hkv : 1;
    for (const float* scales : {p.k_scale, p.v_scale})
      for (int64_t i = 0; i < count; ++i)
        TORCH_CHECK_VALUE(scales[i] > 0.0f && std::isfinite(scales[i]), op, ": ",
                          scales == p.k_scale ? "k_scale" : "v_scale", "[", i, "] = ", scales[i],
                          "; a fixed fp8 scale must be positive and finite");
  }
  int64_t bad = -1;
  FASTAR_CPU_DISPATCH(quantize_kv_append, p, float_kind(l.key), &bad);
  if (bad < 0) return;
  std::string what;
  switch (float_kind(l.key)) {
    case FloatKind::kFloat16:
      what = describe_bad_row<c10::Half>(p, bad);
      break;
    case FloatKind::kBFloat16:
      what = describe_bad_row<c10::BFloat16>(p, bad);
      break;
    default:
      what = describe_bad_row<float>(p, bad);
  }
  TORCH_CHECK_VALUE(false, op, ": ", what, "; a quantized cache stores finite values only");
}

}  // namespace fastar
