// The KIVI int4 / int2 cache format (docs/quantized_kvcache.md): float16 scale and zero, asymmetric codes packed
// little-endian. The per-element math of the CPU and CUDA kernels of fastar.quantize_kivi_append; like
// core/kv_quant.h, every step is an IEEE float32 operation, so every backend writes the same bits.
#pragma once
#include <cstdint>
#include <cstring>

#include "core/kv_quant.h"

namespace fastar {

// fastar.quantize_kivi_append. Keys: rows [g * G, (g + 1) * G) of key form group g, quantized per channel over
// its G tokens into cache group key_groups[g] (slots [key_groups[g] * G, + G)); values: row n per token over
// groups of G channels into slot value_slots[n]. -1 skips a group or a token.
struct KiviAppendParams {
  const void* key;    // [Nk, Hkv, D], unit stride along D
  const void* value;  // [Nv, Hkv, D]
  int64_t k_sn, k_sh, v_sn, v_sh;
  const int64_t* key_groups;   // [Nk / G]
  const int64_t* value_slots;  // [Nv]
  int64_t Nk, Nv, Hkv, D, G, bits, num_slots;
  uint8_t* k_codes;  // [num_slots, Hkv, D * bits / 8]
  uint8_t* v_codes;
  uint16_t* k_scale;  // float16 [num_slots / G, Hkv, D]
  uint16_t* k_zero;
  uint16_t* v_scale;  // float16 [num_slots, Hkv, D / G]
  uint16_t* v_zero;
};

FASTAR_HD float float_from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// float -> float16 bits, rounding to nearest even (as torch's Tensor.half()); overflow gives +-inf, NaN 0x7e00.
FASTAR_HD uint16_t float_to_half(float x) {
  const uint32_t f = float_bits(x), sign = f >> 16 & 0x8000u, a = f & 0x7fffffffu;
  uint32_t h;
  if (a >= 0x47800000u) {  // |x| >= 65536, inf, NaN
    h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (a < 0x38800000u) {  // below float16's smallest normal: 0.5 + |x| rounds |x| to a multiple of 2^-24
    h = float_bits(float_from_bits(a) + 0.5f) - 0x3f000000u;
  } else {  // rebias, round the mantissa to 10 bits (ties to even); a carry may reach inf, which is right
    h = (a + 0xc8000fffu + (a >> 13 & 1u)) >> 13;
  }
  return static_cast<uint16_t>(sign | h);
}

// float16 bits -> float, exactly.
FASTAR_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = h >> 10 & 0x1fu, m = h & 0x3ffu;
  const float subnormal = static_cast<float>(static_cast<int32_t>(m)) * 5.9604644775390625e-08f;  // m * 2^-24
  const uint32_t bits = e == 0 ? float_bits(subnormal) : e == 31 ? 0x7f800000u | m << 13 : (e + 112) << 23 | m << 13;
  return float_from_bits(sign | bits);
}

// A group's float16 zero and scale from its minimum and maximum (KIVI: zero = min, scale = (max - zero) /
// (2^bits - 1), each rounded to float16), and their float values, which the codes use.
struct KiviRange {
  uint16_t scale_h, zero_h;
  float scale, zero;
};

FASTAR_HD KiviRange kivi_range(float lo, float hi, int bits) {
  KiviRange r;
  r.zero_h = float_to_half(lo);
  r.zero = half_to_float(r.zero_h);
  r.scale_h = float_to_half((hi - r.zero) / static_cast<float>((1 << bits) - 1));
  r.scale = half_to_float(r.scale_h);
  return r;
}

// round_half_even((x - zero) / scale) within [0, 2^bits - 1]; a scale that is not positive divides by 1.
FASTAR_HD uint32_t kivi_code(float x, const KiviRange& r, int bits) {
  const float levels = static_cast<float>((1 << bits) - 1);
  const float q = (x - r.zero) / (r.scale > 0.0f ? r.scale : 1.0f);
  const float c = q > -1.0f ? (q < levels + 1.0f ? q : levels + 1.0f) : -1.0f;  // keeps round_small exact
  const float rounded = round_small(c);
  return static_cast<uint32_t>(rounded < 0.0f ? 0.0f : rounded > levels ? levels : rounded);
}

}  // namespace fastar
