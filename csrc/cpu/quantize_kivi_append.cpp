// fastar.quantize_kivi_append on the CPU (ops/quantize_kivi_append_args.h): group and slot ids and the values
// (finite, within float16's range) are checked before anything is written; then scalar loops over
// core/kivi_quant.h. An append quantizes a token's values and, every G tokens, one group of keys: small next to
// the attention that reads them.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/quantize_kivi_append_args.h"

namespace fastar {
namespace {

constexpr float kHalfMax = 65504.0f;

template <typename T>
const T* row_of(const void* base, int64_t sn, int64_t sh, int64_t n, int64_t h) {
  return static_cast<const T*>(base) + n * sn + h * sh;
}

// codes[0..D) (each below 2^bits) packed little-endian into out[0 .. D * bits / 8).
void pack(const uint8_t* codes, int64_t D, int64_t bits, uint8_t* out) {
  const int64_t per_byte = 8 / bits;
  for (int64_t b = 0; b < D / per_byte; ++b) {
    uint32_t v = 0;
    for (int64_t j = 0; j < per_byte; ++j) v |= static_cast<uint32_t>(codes[b * per_byte + j]) << (j * bits);
    out[b] = static_cast<uint8_t>(v);
  }
}

// Raises for the first element of the rows to be written that is NaN, infinite or past float16's range.
template <typename T>
void check_values(const KiviAppendParams& p, const char* op) {
  auto check_row = [&](const T* row, const char* name, int64_t n, int64_t h) {
    for (int64_t d = 0; d < p.D; ++d) {
      const float x = static_cast<float>(row[d]);
      TORCH_CHECK_VALUE(std::fabs(x) <= kHalfMax, op, ": ", name, "[", n, ", ", h, ", ", d, "] = ", x,
                        "; a KIVI cache stores float16 scales and zeros, so values must be finite and within +-",
                        kHalfMax);
    }
  };
  for (int64_t n = 0; n < p.Nk; ++n)
    if (p.key_groups[n / p.G] >= 0)
      for (int64_t h = 0; h < p.Hkv; ++h) check_row(row_of<T>(p.key, p.k_sn, p.k_sh, n, h), "key", n, h);
  for (int64_t n = 0; n < p.Nv; ++n)
    if (p.value_slots[n] >= 0)
      for (int64_t h = 0; h < p.Hkv; ++h) check_row(row_of<T>(p.value, p.v_sn, p.v_sh, n, h), "value", n, h);
}

template <typename T>
void quantize(const KiviAppendParams& p) {
  const int64_t D = p.D, G = p.G, bits = p.bits, bytes = D * bits / 8, groups = D / G;
  std::vector<float> lo(static_cast<size_t>(D)), hi(static_cast<size_t>(D));
  std::vector<KiviRange> range(static_cast<size_t>(D));
  std::vector<uint8_t> codes(static_cast<size_t>(D));
  for (int64_t g = 0; g < p.Nk / G; ++g) {  // keys: per channel over the group's G tokens
    const int64_t group = p.key_groups[g];
    if (group < 0) continue;
    for (int64_t h = 0; h < p.Hkv; ++h) {
      std::fill(lo.begin(), lo.end(), INFINITY);
      std::fill(hi.begin(), hi.end(), -INFINITY);
      for (int64_t i = 0; i < G; ++i) {
        const T* row = row_of<T>(p.key, p.k_sn, p.k_sh, g * G + i, h);
        for (int64_t d = 0; d < D; ++d) {
          const float x = static_cast<float>(row[d]);
          lo[d] = std::min(lo[d], x);
          hi[d] = std::max(hi[d], x);
        }
      }
      const int64_t meta = (group * p.Hkv + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        range[d] = kivi_range(lo[d], hi[d], static_cast<int>(bits));
        p.k_scale[meta + d] = range[d].scale_h;
        p.k_zero[meta + d] = range[d].zero_h;
      }
      for (int64_t i = 0; i < G; ++i) {
        const T* row = row_of<T>(p.key, p.k_sn, p.k_sh, g * G + i, h);
        for (int64_t d = 0; d < D; ++d)
          codes[d] = static_cast<uint8_t>(kivi_code(static_cast<float>(row[d]), range[d], static_cast<int>(bits)));
        pack(codes.data(), D, bits, p.k_codes + ((group * G + i) * p.Hkv + h) * bytes);
      }
    }
  }
  for (int64_t n = 0; n < p.Nv; ++n) {  // values: per token over groups of G channels
    const int64_t slot = p.value_slots[n];
    if (slot < 0) continue;
    for (int64_t h = 0; h < p.Hkv; ++h) {
      const T* row = row_of<T>(p.value, p.v_sn, p.v_sh, n, h);
      for (int64_t c = 0; c < groups; ++c) {
        float l = INFINITY, u = -INFINITY;
        for (int64_t d = c * G; d < (c + 1) * G; ++d) {
          l = std::min(l, static_cast<float>(row[d]));
          u = std::max(u, static_cast<float>(row[d]));
        }
        const KiviRange r = kivi_range(l, u, static_cast<int>(bits));
        p.v_scale[(slot * p.Hkv + h) * groups + c] = r.scale_h;
        p.v_zero[(slot * p.Hkv + h) * groups + c] = r.zero_h;
        for (int64_t d = c * G; d < (c + 1) * G; ++d)
          codes[d] = static_cast<uint8_t>(kivi_code(static_cast<float>(row[d]), r, static_cast<int>(bits)));
      }
      pack(codes.data(), D, bits, p.v_codes + (slot * p.Hkv + h) * bytes);
    }
  }
}

template <typename T>
void run(const KiviAppendParams& p, const char* op) {
  check_values<T>(p, op);
  quantize<T>(p);
}

}  // namespace

void run_quantize_kivi_append_cpu(KiviAppendLaunch& l) {
  constexpr const char* op = "fastar.quantize_kivi_append";
  TORCH_CHECK_VALUE(l.key.is_cpu(), op, ": expected CPU tensors");
  const KiviAppendParams& p = l.prm;
  for (int64_t g = 0; g < p.Nk / p.G; ++g)
    TORCH_CHECK_INDEX(p.key_groups[g] >= -1 && p.key_groups[g] < p.num_slots / p.G, op, ": key_groups[", g,
                      "] = ", p.key_groups[g], " is outside [-1, ", p.num_slots / p.G, ") (-1 skips a group)");
  for (int64_t n = 0; n < p.Nv; ++n)
    TORCH_CHECK_INDEX(p.value_slots[n] >= -1 && p.value_slots[n] < p.num_slots, op, ": value_slots[", n,
                      "] = ", p.value_slots[n], " is outside [-1, ", p.num_slots, ") (-1 skips a token)");
  switch (float_kind(l.key)) {
    case FloatKind::kFloat16:
      return run<c10::Half>(p, op);
    case FloatKind::kBFloat16:
      return run<c10::BFloat16>(p, op);
    default:
      return run<float>(p, op);
  }
}

}  // namespace fastar
