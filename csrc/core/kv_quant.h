// The quantized KV cache formats (docs/quantized_kvcache.md): the per-element math of the CPU and CUDA kernels.
// Every step is an IEEE float32 operation (one correctly rounded division, rounding half to even), so every
// backend writes the same codes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/macros.h"

namespace fastar {

enum class KvFormat : int { kInt8 = 0, kFp8E4M3 = 1, kFp8E5M2 = 2 };

// fastar.quantize_kv_append: token n's K and V rows go to cache slot slots[n] (-1: skipped).
struct QuantizeKvParams {
  const void* key;  // [N, Hkv, D], unit stride along D
  const void* value;
  int64_t k_sn, k_sh, v_sn, v_sh;  // token and head strides, in elements
  const int64_t* slots;            // [N]
  int64_t N, Hkv, D, num_slots;
  uint8_t* k_cache;  // [num_slots, Hkv, D] one-byte codes, contiguous
  uint8_t* v_cache;
  // per_token_scale: [num_slots, Hkv], computed from each row and written. Else (fp8 only) read: [Hkv] when
  // scale_per_head, else one value.
  float* k_scale;
  float* v_scale;
  bool per_token_scale;
  bool scale_per_head;
  KvFormat format;
};

// Calls f(std::integral_constant<KvFormat, format>{}) (host code): kernels are instantiated per format.
template <typename F>
inline void with_kv_format(KvFormat format, F&& f) {
  switch (format) {
    case KvFormat::kInt8:
      return f(std::integral_constant<KvFormat, KvFormat::kInt8>{});
    case KvFormat::kFp8E4M3:
      return f(std::integral_constant<KvFormat, KvFormat::kFp8E4M3>{});
    case KvFormat::kFp8E5M2:
      return f(std::integral_constant<KvFormat, KvFormat::kFp8E5M2>{});
  }
}

// The largest code magnitude: a row's scale is max|x| / kv_code_max.
FASTAR_HD float kv_code_max(KvFormat f) {
  return f == KvFormat::kInt8 ? 127.0f : f == KvFormat::kFp8E4M3 ? 448.0f : 57344.0f;
}

FASTAR_HD uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// Round half to even of 0 <= x < 2^22, by float addition (exact under the default rounding mode; an FMA
// contraction of a product of x by a power of two before it changes nothing).
FASTAR_HD float round_small(float x) { return (x + 12582912.0f) - 12582912.0f; }

// float -> fp8 (e4m3fn: bias 7, 3 mantissa bits, no infinities; e5m2: bias 15, 2 mantissa bits), rounding to
// nearest even and saturating at the largest finite magnitude; NaN and +-Inf give the NaN code 0x7f (signed).
// Branch-free, so that the CPU loops over it vectorize.
template <KvFormat F>
FASTAR_HD uint8_t float_to_fp8(float x) {
  constexpr bool kE4M3 = F == KvFormat::kFp8E4M3;
  constexpr int kMant = kE4M3 ? 3 : 2, kBias = kE4M3 ? 7 : 15;
  constexpr float kMax = kE4M3 ? 448.0f : 57344.0f;
  constexpr float kMinNormal = kE4M3 ? 0.015625f : 6.103515625e-05f;  // 2^(1 - bias)
  constexpr float kSubnormalSteps = kE4M3 ? 512.0f : 65536.0f;        // 1 / 2^(1 - bias - mant)
  const uint32_t sign = float_bits(x) >> 24 & 0x80;
  const float a = fabsf(x);
  const bool finite = a <= 3.4028235e38f;
  const float c = a < kMax ? a : kMax;  // comparisons, not fminf: they vectorize
  const uint32_t subnormal = static_cast<uint32_t>(static_cast<int32_t>(round_small(c * kSubnormalSteps)));
  uint32_t b = float_bits(c);
  b += (1u << (22 - kMant)) - 1 + (b >> (23 - kMant) & 1);  // round the float32 mantissa to kMant bits
  const uint32_t normal = (b >> (23 - kMant)) - (static_cast<uint32_t>(127 - kBias) << kMant);
  const uint32_t code = !finite ? 0x7fu : c < kMinNormal ? subnormal : normal;
  return static_cast<uint8_t>(sign | code);
}

// int8: round half to even of q, within [-127, 127] (NaN gives -127; the kernels reject or flag it earlier).
FASTAR_HD uint8_t int8_code(float q) {
  const float low = q > -127.0f ? q : -127.0f;
  const float r = low < 127.0f ? low : 127.0f;
  const float m = round_small(fabsf(r));  // outside the select: a conditional float add blocks vectorization
  const float rounded = r < 0.0f ? -m : m;
  return static_cast<uint8_t>(static_cast<int32_t>(rounded));
}

// The code of x at scale s. A scale that is not positive (an all-zero row's 0, a NaN) divides by 1.
template <KvFormat F>
FASTAR_HD uint8_t kv_code(float x, float s) {
  const float q = x / (s > 0.0f ? s : 1.0f);
  if constexpr (F == KvFormat::kInt8) {
    return int8_code(q);
  } else {
    return float_to_fp8<F>(q);
  }
}

// The value of an fp8 code (the inverse of float_to_fp8: subnormals, signed zeros, e5m2's infinities, NaN), bit
// for bit torch's float8 -> float32 conversion (its NaNs: e4m3 0x7ff00000, e5m2 quiet with the code's mantissa):
// the significand (with its implicit bit when the exponent field is not 0) times a power of two, then NaN / inf
// blended in by a bit mask, not a select, so that loops over it vectorize (a select let GCC sink the float
// multiply into a branch).
template <KvFormat F>
FASTAR_HD float fp8_to_float(uint8_t code) {
  constexpr bool kE4M3 = F == KvFormat::kFp8E4M3;
  constexpr int kMant = kE4M3 ? 3 : 2, kBias = kE4M3 ? 7 : 15;
  const uint32_t sign = static_cast<uint32_t>(code & 0x80) << 24, em = code & 0x7fu;
  const uint32_t exponent = em >> kMant, mantissa = em & ((1u << kMant) - 1);
  const uint32_t significand = (exponent != 0 ? 1u << kMant : 0u) + mantissa;
  const uint32_t pow_bits = ((exponent != 0 ? exponent : 1u) + 127 - kBias - kMant) << 23;
  float pow;
  std::memcpy(&pow, &pow_bits, 4);
  const uint32_t magnitude = float_bits(static_cast<float>(static_cast<int32_t>(significand)) * pow);
  const bool special = kE4M3 ? em == 0x7f : exponent == 31;  // e4m3: NaN; e5m2: +-inf (mantissa 0) or NaN
  const uint32_t quiet = 0x400000u & (0u - static_cast<uint32_t>(mantissa != 0));  // e5m2's NaNs quieted
  const uint32_t special_bits = 0x7f800000u | (kE4M3 ? 0x700000u : mantissa << (23 - kMant) | quiet);
  const uint32_t mask = 0u - static_cast<uint32_t>(special);
  const uint32_t bits = sign | (special_bits & mask) | (magnitude & ~mask);
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// The value of a code of format F, before its scale.
template <KvFormat F>
FASTAR_HD float kv_code_value(uint8_t code) {
  if constexpr (F == KvFormat::kInt8) {
    return static_cast<float>(static_cast<int8_t>(code));
  } else {
    return fp8_to_float<F>(code);
  }
}

// One code of format F as stored: the element type of the kernels' loops over quantized rows (the CPU's vector
// layer, cpu/vec.h, loads it into float lanes; the CUDA kernels are instantiated per KvCode), so those loops are
// templates on their element type.
template <KvFormat F>
struct KvCode {
  static constexpr KvFormat kFormat = F;
  uint8_t bits;
};

template <typename KV>
inline constexpr bool kIsKvCode = false;
template <KvFormat F>
inline constexpr bool kIsKvCode<KvCode<F>> = true;

}  // namespace fastar
