// The attention kernel's micro-kernels, written once against the vector layer (cpu/vec.h) and compiled
// per ISA: row reductions, the decode path's dot/axpy loops, and the register-blocked GEMMs of the tile path.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/kivi_quant.h"
#include "core/kv_quant.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN

// max(init, x[0..n))
inline float max_of(const float* x, int64_t n, float init) {
  int64_t i = 0;
  float m = init;
  if (n >= kW) {
    Vec mv = Vec::broadcast(init);
    for (; i + kW <= n; i += kW) mv = max(mv, Vec::load(x + i));
    m = hmax(mv);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The lane-wise max of the vectors x[c * ld] for c < n, and init: four independent chains, so the loop runs at
// the max's throughput rather than its latency.
inline Vec column_max(const float* x, int64_t ld, int64_t n, Vec init) {
  Vec m[4] = {init, init, init, init};
  int64_t c = 0;
  for (; c + 4 <= n; c += 4)
    for (int j = 0; j < 4; ++j) m[j] = max(m[j], Vec::load(x + (c + j) * ld));
  for (; c < n; ++c) m[0] = max(m[0], Vec::load(x + c * ld));
  return max(max(m[0], m[1]), max(m[2], m[3]));
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  int64_t i = 0;
  Vec acc = Vec::zero();
  const Vec sv = Vec::broadcast(shift);
  for (; i + kW <= n; i += kW) {
    const Vec e = exp(Vec::load(x + i) - sv);
    e.store(x + i);
    acc = acc + e;
  }
  float sum = hsum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// x[i] *= y[i] for i < n.
inline void scale_row(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (Vec::load(x + i) * Vec::load(y + i)).store(x + i);
  for (; i < n; ++i) x[i] *= y[i];
}

// Whether x[0..n) holds no NaN and no infinity (x - x is 0 exactly for finite x).
inline bool all_finite(const float* x, int64_t n) {
  int64_t i = 0;
  Vec acc = Vec::zero();
  for (; i + kW <= n; i += kW) {
    const Vec v = Vec::load(x + i);
    acc = acc + (v - v);
  }
  bool finite = !any_nan(acc);
  for (; i < n; ++i) finite &= std::isfinite(x[i]);
  return finite;
}

// A decode row as the micro-kernels read it (load_at: the vector at element d; value_at: element e in float): a
// pointer to float, 16-bit or KvCode<F> elements, or one of the KIVI rows below.
template <typename T>
inline Vec load_at(const T* row, int64_t d) {
  return Vec::load(row + d);
}
template <typename T>
inline float value_at(const T* row, int64_t e) {
  return to_f(row[e]);
}

// KIVI code e of a row packed kBits per code (little-endian).
template <int kBits>
inline float kivi_code(const uint8_t* codes, int64_t e) {
  return static_cast<float>(codes[e * kBits / 8] >> (e * kBits % 8) & ((1u << kBits) - 1));
}

// A row of KIVI codes read as the codes themselves (a key row: its per-channel scales and zeros are folded into
// the query and the logit).
template <int kBits>
struct KiviCodes {
  const uint8_t* codes;
};
template <int kBits>
inline Vec load_at(KiviCodes<kBits> row, int64_t d) {  // d a multiple of kW
  return Vec::template load_packed<kBits>(row.codes + d * kBits / 8);
}
template <int kBits>
inline float value_at(KiviCodes<kBits> row, int64_t e) {
  return kivi_code<kBits>(row.codes, e);
}

// A KIVI value row: code * scale + zero with channel d's scale and zero (float) at [d / per], dequantized in
// registers; or, where window is not null, the row there (of the full-precision window, element type W).
// per_shift: log2(per) where per is a power of two and a multiple of kW (a vector in one group), else -1.
template <int kBits, typename W>
struct KiviValueRow {
  const uint8_t* codes;
  const float* scale;
  const float* zero;
  int64_t per;
  int per_shift;
  const W* window;
};
template <int kBits, typename W>
inline Vec load_at(const KiviValueRow<kBits, W>& row, int64_t d) {  // d a multiple of kW
  if (row.window) return Vec::load(row.window + d);
  const Vec c = Vec::template load_packed<kBits>(row.codes + d * kBits / 8);
  if (row.per_shift >= 0) {
    const int64_t g = d >> row.per_shift;
    return fmadd(c, Vec::broadcast(row.scale + g), Vec::broadcast(row.zero + g));
  }
  float s[kW], z[kW];
  for (int i = 0; i < kW; ++i) s[i] = row.scale[(d + i) / row.per];
  for (int i = 0; i < kW; ++i) z[i] = row.zero[(d + i) / row.per];
  return fmadd(c, Vec::load(s), Vec::load(z));
}
template <int kBits, typename W>
inline float value_at(const KiviValueRow<kBits, W>& row, int64_t e) {
  if (row.window) return to_f(row.window[e]);
  return kivi_code<kBits>(row.codes, e) * row.scale[e / row.per] + row.zero[e / row.per];
}

// The decode path's products, over K / V rows of a row type T above: each vector of a row is loaded (converted)
// once for up to kStreamRows query rows, in blocks of NR rows.
constexpr int kStreamRows = 4;
// Vectors of a row per axpy block of NR rows: NR * NV accumulators, NR weights and a loaded vector in the ISA's
// registers (32 with AVX-512, else 16).
constexpr int axpy_vecs(int nr) {
  const int regs = FASTAR_ISA_LEVEL >= 2 ? 32 : 16, most = (regs - 1 - nr) / nr;
  return most >= 8 ? 8 : most >= 4 ? 4 : most >= 2 ? 2 : 1;
}

// out[r * ld] = a vector whose lanes sum to dot(q[r * D .. r * D + D), row[0..D)), for r < NR.
template <int NR, typename T>
inline void dot_vectors(const float* q, T row, int64_t D, Vec* out, int64_t ld) {
  Vec acc[NR][2];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = Vec::zero();
  int64_t d = 0;
  for (; d + 2 * kW <= D; d += 2 * kW) {
    const Vec k0 = load_at(row, d), k1 = load_at(row, d + kW);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      acc[r][0] = fmadd(Vec::load(q + r * D + d), k0, acc[r][0]);
      acc[r][1] = fmadd(Vec::load(q + r * D + d + kW), k1, acc[r][1]);
    }
  }
  if (d + kW <= D) {
    const Vec k0 = load_at(row, d);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[r][0] = fmadd(Vec::load(q + r * D + d), k0, acc[r][0]);
    d += kW;
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    out[r * ld] = acc[r][0] + acc[r][1];
    if (d == D) continue;
    float tail[kW] = {};
    for (int64_t e = d; e < D; ++e) tail[0] += q[r * D + e] * value_at(row, e);
    out[r * ld] = out[r * ld] + Vec::load(tail);
  }
}

// dot_vectors for nr < NR rows.
template <int NR, typename T>
inline void dot_vectors_tail(int nr, const float* q, T row, int64_t D, Vec* out, int64_t ld) {
  if constexpr (NR > 0) {
    if (nr == NR) return dot_vectors<NR>(q, row, D, out, ld);
    dot_vectors_tail<NR - 1>(nr, q, row, D, out, ld);
  }
}

// Keys per dot_key_group: each loaded query vector serves that many keys (AVX-512: 4 rows x 4 keys accumulators, 4
// key vectors and a query vector in 32 registers; else 4 x 2 and 2 in 16), so a key costs NR * D / (NK * kW)
// query loads instead of NR * D / kW, which bounded the decode's logits by the load ports rather than the FMAs.
constexpr int kKeyGroup = FASTAR_ISA_LEVEL >= 2 ? 4 : 2;

// out[r * ld + c] = a vector whose lanes sum to dot(q[r * D .. r * D + D), rows[c][0..D)), for r < NR, c < NK.
template <int NR, int NK, typename T>
inline void dot_key_group(const float* q, const T* rows, int64_t D, Vec* out, int64_t ld) {
  Vec acc[NR][NK];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) acc[r][c] = Vec::zero();
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    Vec k[NK];
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) k[c] = load_at(rows[c], d);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const Vec qv = Vec::load(q + r * D + d);
#pragma GCC unroll 8
      for (int c = 0; c < NK; ++c) acc[r][c] = fmadd(qv, k[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) {
      out[r * ld + c] = acc[r][c];
      if (d == D) continue;
      float tail[kW] = {};
      for (int64_t e = d; e < D; ++e) tail[0] += q[r * D + e] * value_at(rows[c], e);
      out[r * ld + c] = out[r * ld + c] + Vec::load(tail);
    }
}

// dot_key_group for 2 <= nr <= NR rows (one row shares no query load).
template <int NR, int NK, typename T>
inline void dot_key_group_tail(int nr, const float* q, const T* rows, int64_t D, Vec* out, int64_t ld) {
  if constexpr (NR > 1) {
    if (nr == NR) return dot_key_group<NR, NK>(q, rows, D, out, ld);
    dot_key_group_tail<NR - 1, NK>(nr, q, rows, D, out, ld);
  }
}

inline const float* query_rows(const float* q, int64_t r0, int64_t D) { return q + r0 * D; }

#if FASTAR_ISA_LEVEL >= 1
// 16-bit queries over int8 keys (AVX2 and up): row r of the queries is scale[r] * q[r * D .. r * D + D), so the
// logits' products are integer (dot_pairs: 2 kW products an instruction, the float path's FMA kW).
struct QueryI16 {
  const int16_t* q;
  const float* scale;
};
inline QueryI16 query_rows(QueryI16 q, int64_t r0, int64_t D) { return {q.q + r0 * D, q.scale + r0}; }

// Rounds q [R, D] to qi with scale[r] = max |q[r]| / 32767 (|qi| <= 32767: sums of D <= 512 products with int8
// codes stay in int32). False, for the float path, where D is not a multiple of VecI16::kSize or past 512, or a
// row is not finite or its largest |q| is 0 or subnormal.
inline bool round_queries_i16(const float* q, int64_t R, int64_t D, int16_t* qi, float* scale) {
  if (D % VecI16::kSize != 0 || D > 512) return false;
  for (int64_t r = 0; r < R; ++r) {
    const float* row = q + r * D;
    if (!all_finite(row, D)) return false;
    Vec m = Vec::zero();
    for (int64_t d = 0; d < D; d += kW) {
      const Vec x = Vec::load(row + d);
      m = max(m, max(x, Vec::zero() - x));
    }
    const float top = hmax(m);
    if (!(top >= std::numeric_limits<float>::min())) return false;
    scale[r] = top / 32767.0f;
    const Vec inv = Vec::broadcast(32767.0f / top);
    for (int64_t d = 0; d < D; d += kW) store_rounded(Vec::load(row + d) * inv, qi + r * D + d);
  }
  return true;
}

// dot_key_group over int8 codes with int16 queries, for NR >= 1 rows (D a multiple of VecI16::kSize).
template <int NR, int NK>
inline void dot_key_group(QueryI16 q, const KvCode<KvFormat::kInt8>* const* rows, int64_t D, Vec* out, int64_t ld) {
  VecI32 acc[NR][NK];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) acc[r][c] = VecI32::zero();
  for (int64_t d = 0; d < D; d += VecI16::kSize) {
    VecI16 k[NK];
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) k[c] = VecI16::widen(rows[c] + d);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const VecI16 qv = VecI16::load(q.q + r * D + d);
#pragma GCC unroll 8
      for (int c = 0; c < NK; ++c) acc[r][c] = dot_pairs(qv, k[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const Vec scale = Vec::broadcast(q.scale + r);
#pragma GCC unroll 8
    for (int c = 0; c < NK; ++c) out[r * ld + c] = to_float(acc[r][c]) * scale;
  }
}
template <int NR, int NK>
inline void dot_key_group_tail(int nr, QueryI16 q, const KvCode<KvFormat::kInt8>* const* rows, int64_t D, Vec* out,
                               int64_t ld) {
  if constexpr (NR > 0) {
    if (nr == NR) return dot_key_group<NR, NK>(q, rows, D, out, ld);
    dot_key_group_tail<NR - 1, NK>(nr, q, rows, D, out, ld);
  }
}
template <int NR>
inline void dot_vectors_tail(int nr, QueryI16 q, const KvCode<KvFormat::kInt8>* row, int64_t D, Vec* out, int64_t ld) {
  dot_key_group_tail<NR, 1>(nr, q, &row, D, out, ld);
}
#endif

// s[r * ld + c] = scale[c] * dot(q[r * D .. r * D + D), rows[c][0..D)) for the R query rows at q [R, D] and the n
// keys' rows (scale null: 1), calling step() after each key: each vector of a row is loaded (converted) once per
// kStreamRows query rows, each query vector once per kKeyGroup keys, and kW keys' products are summed across their
// lanes together (hsums), not one by one.
// q: float rows, or a QueryI16 over int8 keys.
template <typename Q, typename T, typename Step>
inline void dot_keys(Q q, int64_t R, const T* rows, int64_t n, int64_t D, const float* scale, float* s, int64_t ld,
                     Step&& step) {
  Vec part[kStreamRows * kW];  // [r][c]: row r's vector for key c0 + c
  for (int64_t c0 = 0; c0 < n; c0 += kW) {
    const int m = static_cast<int>(std::min<int64_t>(kW, n - c0));
    float sc[kW];
    for (int c = 0; c < kW; ++c) sc[c] = c < m && scale ? scale[c0 + c] : 1.0f;
    for (int64_t r0 = 0; r0 < R; r0 += kStreamRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kStreamRows, R - r0));
      int c = 0;
      for (; nr > 1 && c + kKeyGroup <= m; c += kKeyGroup) {
        dot_key_group_tail<kStreamRows, kKeyGroup>(nr, query_rows(q, r0, D), rows + c0 + c, D, part + c, kW);
        if (r0 == 0)
          for (int j = 0; j < kKeyGroup; ++j) step();
      }
      for (; c < m; ++c) {
        dot_vectors_tail<kStreamRows>(nr, query_rows(q, r0, D), rows[c0 + c], D, part + c, kW);
        if (r0 == 0) step();
      }
      for (int r = 0; r < nr; ++r) {
        for (int c = m; c < kW; ++c) part[r * kW + c] = Vec::zero();
        const Vec x = hsums(part + r * kW) * Vec::load(sc);
        if (m == kW) {
          x.store(s + (r0 + r) * ld + c0);
        } else {
          float out[kW];
          x.store(out);
          std::copy(out, out + m, s + (r0 + r) * ld + c0);
        }
      }
    }
  }
}

// o[r * D + d0 + i] += sum_c w[r * ldw + c] * rows[c][d0 + i] for r < NR, i < NV vectors: o in registers across
// the rows.
template <int NR, int NV, typename T>
inline void axpy_block(float* o, int64_t D, const float* w, int64_t ldw, const T* rows, int64_t n, int64_t d0) {
  Vec acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i] = Vec::load(o + r * D + d0 + kW * i);
  for (int64_t c = 0; c < n; ++c) {
    Vec wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = Vec::broadcast(w + r * ldw + c);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      const Vec v = load_at(rows[c], d0 + kW * i);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[r][i] = fmadd(wv[r], v, acc[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) acc[r][i].store(o + r * D + d0 + kW * i);
}

// o[r * D .. r * D + D) += sum_c w[r * ldw + c] * rows[c][0..D) for r < NR: blocks of axpy_vecs(NR) vectors, then
// single vectors, then the lanes past the last whole vector.
template <int NR, typename T>
inline void axpy_rows(float* o, int64_t D, const float* w, int64_t ldw, const T* rows, int64_t n) {
  constexpr int NV = axpy_vecs(NR);
  int64_t d = 0;
  for (; d + NV * kW <= D; d += NV * kW) axpy_block<NR, NV>(o, D, w, ldw, rows, n, d);
  if constexpr (NV > 1)
    for (; d + kW <= D; d += kW) axpy_block<NR, 1>(o, D, w, ldw, rows, n, d);
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
    for (int64_t e = d; e < D; ++e) {
      float acc = o[r * D + e];
      for (int64_t c = 0; c < n; ++c) acc += w[r * ldw + c] * value_at(rows[c], e);
      o[r * D + e] = acc;
    }
}

// axpy_rows for nr < NR rows.
template <int NR, typename T>
inline void axpy_rows_tail(int nr, float* o, int64_t D, const float* w, int64_t ldw, const T* rows, int64_t n) {
  if constexpr (NR > 0) {
    if (nr == NR) return axpy_rows<NR>(o, D, w, ldw, rows, n);
    axpy_rows_tail<NR - 1>(nr, o, D, w, ldw, rows, n);
  }
}

// o[r * D .. r * D + D) += sum_c w[r * ldw + c] * rows[c][0..D) for the R rows of o [R, D]: the decode path's P V.
template <typename T>
inline void axpy_row(float* o, int64_t R, int64_t D, const float* w, int64_t ldw, const T* rows, int64_t n) {
  int64_t r = 0;
  for (; r + kStreamRows <= R; r += kStreamRows) axpy_rows<kStreamRows>(o + r * D, D, w + r * ldw, ldw, rows, n);
  axpy_rows_tail<kStreamRows - 1>(static_cast<int>(R - r), o + r * D, D, w + r * ldw, ldw, rows, n);
}

// qs[0..D) = q * scale and returns q . zero, with float16 scale and zero per channel: a KIVI key group's scales
// and zeros folded into a query row (q . k = qs . codes + q . zero for the group's keys k).
inline float fold_key_scales(const float* q, const c10::Half* scale, const c10::Half* zero, float* qs, int64_t D) {
  Vec acc = Vec::zero();
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const Vec x = Vec::load(q + d);
    (x * Vec::load(scale + d)).store(qs + d);
    acc = fmadd(x, Vec::load(zero + d), acc);
  }
  float z = hsum(acc);
  for (; d < D; ++d) {
    qs[d] = q[d] * to_f(scale[d]);
    z += q[d] * to_f(zero[d]);
  }
  return z;
}

template <typename T>
inline float sum_squares(const T* x, int64_t D) {
  int64_t d = 0;
  Vec acc = Vec::zero();
  for (; d + kW <= D; d += kW) {
    const Vec v = Vec::load(x + d);
    acc = fmadd(v, v, acc);
  }
  float s = hsum(acc);
  for (; d < D; ++d) s += to_f(x[d]) * to_f(x[d]);
  return s;
}

// dst[0..D) = row[0..D) in float times scale (1 for 16-bit rows; a quantized row's scale for its codes).
template <typename T>
inline void to_float_row(const T* row, float scale, float* dst, int64_t D) {
  const Vec sv = Vec::broadcast(scale);
  int64_t d = 0;
  for (; d + kW <= D; d += kW) (Vec::load(row + d) * sv).store(dst + d);
  for (; d < D; ++d) dst[d] = to_f(row[d]) * scale;
}

// One row of KIVI codes (kBits per code, packed little-endian) dequantized to float: code * scale + zero, with
// channel d's float16 scale and zero at [d / per], per = 1 for keys (one per channel) or G for values. Two passes
// over dst (in L1): the codes unpacked by constant shifts (a loop GCC vectorizes), then the scale and zero.
template <int kBits>
inline void kivi_dequantize_row(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, int64_t per,
                                float* dst, int64_t D) {
  constexpr int kPerByte = 8 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  for (int64_t b = 0; b < D / kPerByte; ++b)
    for (int j = 0; j < kPerByte; ++j) dst[b * kPerByte + j] = static_cast<float>(codes[b] >> (j * kBits) & kMask);
  const auto* scale_h = reinterpret_cast<const c10::Half*>(scale);
  const auto* zero_h = reinterpret_cast<const c10::Half*>(zero);
  int64_t d = 0;
  if (per == 1) {
    for (; d + kW <= D; d += kW)
      fmadd(Vec::load(dst + d), Vec::load(scale_h + d), Vec::load(zero_h + d)).store(dst + d);
  } else if (per % kW == 0) {
    for (; d < D; d += per) {
      const Vec s = Vec::broadcast(half_to_float(scale[d / per])), z = Vec::broadcast(half_to_float(zero[d / per]));
      for (int64_t e = d; e < d + per; e += kW) fmadd(Vec::load(dst + e), s, z).store(dst + e);
    }
  }
  for (; d < D; ++d) dst[d] = dst[d] * half_to_float(scale[d / per]) + half_to_float(zero[d / per]);
}

// Software prefetch of the next key tile's K and V rows (and a quantized cache's scales, single lines, first)
// into L2, spread over the current tile's GEMM blocks or keys: issued in one burst, they would fill the core's
// miss buffers and stall it.
struct RowPrefetch {
  static constexpr int64_t kMaxRows = 256, kMaxLines = 256;
  const char* rows[kMaxRows];
  const char* lines[kMaxLines];
  int64_t n_rows = 0, lines_per_row = 0, n_lines = 0, per_step = 0, row = 0, line = 0, next_line = 0;

  void step() {
    int64_t i = 0;
    for (; i < per_step && next_line < n_lines; ++i) __builtin_prefetch(lines[next_line++], 0, 2);
    for (; i < per_step && row < n_rows; ++i) {
      __builtin_prefetch(rows[row] + 64 * line, 0, 2);
      if (++line == lines_per_row) line = 0, ++row;
    }
  }
  void finish() {
    per_step = n_lines + n_rows * lines_per_row;
    step();
  }
};

// The two products of the tile path, whose gathered operand is read through row pointers (where the keys'
// rows lie: they are not copied):
//   kLogits  s^T = K q^T: A's row r at a_rows[r] (key rows), element k at [k]; B's row k at b + k * ldb.
//   kValues  o = P V:     A(r, k) at a[r + k * a_ks] (P = s^T read transposed); B's row k at b_rows[k].
enum class Gemm { kLogits, kValues };

struct GemmOperands {
  const float* const* a_rows;
  const float* a;
  int64_t a_ks;
  const float* b;
  int64_t ldb;
  const float* const* b_rows;
};

// Register-blocked C[MR x NV lanes] = A[m0 : m0 + MR, :K] * B[:K, n0 : n0 + NV lanes], vectors of type V.
// With c_scale, C's row r is first multiplied by c_scale[r] (the online softmax's rescaling, folded into the
// accumulator load); without it C is overwritten.
template <Gemm kind, typename V, int MR, int NV>
inline void gemm_block(const GemmOperands& op, int64_t m0, int64_t n0, int64_t K, float* c, int64_t ldc,
                       const float* c_scale) {
  constexpr int W = V::kSize;
  const float* ar[MR];
  V acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
    ar[r] = kind == Gemm::kLogits ? op.a_rows[m0 + r] : op.a + m0 + r;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = c_scale ? V::load(c + r * ldc + W * v) * V::broadcast(c_scale + r) : V::zero();
  }
  // The strided operand's row k, advanced by a pointer step.
  const float* strided = kind == Gemm::kLogits ? op.b + n0 : op.a + m0;
  const int64_t step = kind == Gemm::kLogits ? op.ldb : op.a_ks;
  for (int64_t k = 0; k < K; ++k, strided += step) {
    const float* bk = kind == Gemm::kLogits ? strided : op.b_rows[k] + n0;
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = V::load(bk + W * v);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V av = V::broadcast(kind == Gemm::kLogits ? ar[r] + k : strided + r);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + W * v);
}

// gemm_block for rows < MR (the rows left below the whole blocks).
template <Gemm kind, typename V, int MR, int NV>
inline void gemm_block_tail(int64_t rows, const GemmOperands& op, int64_t m0, int64_t n0, int64_t K, float* c,
                            int64_t ldc, const float* c_scale) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_block<kind, V, MR, NV>(op, m0, n0, K, c, ldc, c_scale);
    gemm_block_tail<kind, V, MR - 1, NV>(rows, op, m0, n0, K, c, ldc, c_scale);
  }
}

// Columns [n0, n0 + NV lanes) of C, in blocks of MR rows; pf takes a step after each whole block.
template <Gemm kind, typename V, int MR, int NV>
inline void gemm_panel(int64_t M, int64_t n0, int64_t K, const GemmOperands& op, float* c, int64_t ldc,
                       const float* c_scale, RowPrefetch& pf) {
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR) {
    gemm_block<kind, V, MR, NV>(op, m0, n0, K, c + m0 * ldc + n0, ldc, c_scale ? c_scale + m0 : nullptr);
    pf.step();
  }
  gemm_block_tail<kind, V, MR - 1, NV>(M - m0, op, m0, n0, K, c + m0 * ldc + n0, ldc, c_scale ? c_scale + m0 : nullptr);
}

// GEMM blocks a gemm of M x N takes (the steps a prefetch is spread over).
inline int64_t gemm_steps(int64_t M, int64_t N) {
  return (M + kGemmRows - 1) / kGemmRows * ((N + kGemmVecs * kW - 1) / (kGemmVecs * kW));
}

// C[M x N] = A[M x K] * B[K x N] (+ C scaled per row), N a multiple of 8: panels of kGemmVecs vectors, then
// single vectors in blocks of kGemmRows * kGemmVecs rows (the same accumulator count), then (AVX-512) a last
// 8-column panel of half-width vectors.
template <Gemm kind>
inline void gemm(int64_t M, int64_t N, int64_t K, const GemmOperands& op, float* c, int64_t ldc, const float* c_scale,
                 RowPrefetch& pf) {
  int64_t n0 = 0;
  for (; n0 + kGemmVecs * kW <= N; n0 += kGemmVecs * kW)
    gemm_panel<kind, Vec, kGemmRows, kGemmVecs>(M, n0, K, op, c, ldc, c_scale, pf);
  for (; n0 + kW <= N; n0 += kW) gemm_panel<kind, Vec, kGemmRows * kGemmVecs, 1>(M, n0, K, op, c, ldc, c_scale, pf);
#if FASTAR_ISA_LEVEL >= 2
  if (n0 < N) gemm_panel<kind, Vec8, kGemmRows * kGemmVecs, 1>(M, n0, K, op, c, ldc, c_scale, pf);
#endif
}

FASTAR_ISA_END
