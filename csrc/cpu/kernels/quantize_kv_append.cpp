// The CPU kernel of fastar.quantize_kv_append, compiled per ISA (cpu/vec.h): a parallel pass takes each row's
// max |x| (and finds NaN / Inf) with vector loads, then a second pass writes the scales and codes
// (core/kv_quant.h), converting through a float buffer so that the code loops vectorize.
#include "cpu/kernels/quantize_kv_append.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

constexpr int64_t kChunk = 256;  // floats of the conversion buffer

// max |x| of a row, or NaN when it holds NaN or Inf.
template <typename T>
float row_amax(const T* row, int64_t D) {
  Vec m = Vec::zero();
  bool bad = false;
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const Vec x = Vec::load(row + d);
    bad = bad || any_nan(x - x);
    m = max(m, max(x, Vec::zero() - x));
  }
  alignas(64) float lanes[kW];
  m.store(lanes);
  float amax = *std::max_element(lanes, lanes + kW);
  for (; d < D; ++d) {
    const float x = to_f(row[d]);
    bad = bad || !(std::fabs(x) <= 3.4028235e38f);
    amax = std::max(amax, std::fabs(x));
  }
  return bad ? std::numeric_limits<float>::quiet_NaN() : amax;
}

template <KvFormat F, typename T>
void write_row(const T* row, int64_t D, float s, uint8_t* codes) {
  alignas(64) float buf[kChunk];
  alignas(64) uint8_t out[kChunk];  // not `codes`: a byte pointer may alias buf, which stops vectorization
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t n = std::min(kChunk, D - c0);
    int64_t d = 0;
    for (; d + kW <= n; d += kW) Vec::load(row + c0 + d).store(buf + d);
    for (; d < n; ++d) buf[d] = to_f(row[c0 + d]);
    for (d = 0; d < n; ++d) out[d] = kv_code<F>(buf[d], s);
    std::memcpy(codes + c0, out, static_cast<size_t>(n));
  }
}

template <KvFormat F, typename T>
int64_t quantize_rows(const QuantizeKvParams& p) {
  const auto* key = static_cast<const T*>(p.key);
  const auto* value = static_cast<const T*>(p.value);
  auto row_of = [&](int64_t r) {  // r = (token * Hkv + head) * 2 + which
    const int64_t n = r / 2 / p.Hkv, h = r / 2 % p.Hkv;
    return r % 2 ? value + n * p.v_sn + h * p.v_sh : key + n * p.k_sn + h * p.k_sh;
  };
  const int64_t rows = p.N * p.Hkv * 2;
  std::vector<float> amax(static_cast<size_t>(rows));
  std::atomic<int64_t> first_bad{rows};
  at::parallel_for(0, rows, 128, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (p.slots[r / 2 / p.Hkv] < 0) continue;
      amax[r] = row_amax(row_of(r), p.D);
      if (std::isnan(amax[r])) {
        int64_t seen = first_bad.load();
        while (r < seen && !first_bad.compare_exchange_weak(seen, r)) {
        }
      }
    }
  });
  if (first_bad.load() < rows) return first_bad.load();
  at::parallel_for(0, rows, 128, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t slot = p.slots[r / 2 / p.Hkv], h = r / 2 % p.Hkv;
      if (slot < 0) continue;
      float* scales = r % 2 ? p.v_scale : p.k_scale;
      float s;
      if (p.per_token_scale) {
        s = amax[r] / kv_code_max(F);
        scales[slot * p.Hkv + h] = s;
      } else {
        s = scales[p.scale_per_head ? h : 0];
      }
      write_row<F>(row_of(r), p.D, s, (r % 2 ? p.v_cache : p.k_cache) + (slot * p.Hkv + h) * p.D);
    }
  });
  return -1;
}

}  // namespace

void quantize_kv_append(const QuantizeKvParams& prm, FloatKind kind, int64_t* bad_row) {
  with_element_type(kind, [&](auto tag) {
    with_kv_format(prm.format,
                   [&](auto format) { *bad_row = quantize_rows<decltype(format)::value, decltype(tag)>(prm); });
  });
}

FASTAR_ISA_END
