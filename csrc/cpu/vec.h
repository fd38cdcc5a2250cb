// The CPU kernels' vector layer: float vectors of one width per ISA, written against by every kernel under
// csrc/cpu/kernels/. Such a source is compiled once per ISA (CMakeLists.txt defines FASTAR_ISA as generic,
// avx2 or avx512); it includes its other headers first, then this one, and puts its code between
// FASTAR_ISA_BEGIN and FASTAR_ISA_END: inside, the compiler targets that ISA and names live in
// fastar::cpu::<ISA>, so the copies of one kernel never mix (and headers outside stay baseline code).
//
//   type    lanes  ISA                      also
//   Vec4    4      generic (GCC vectors)    SSE2 on x86-64, NEON on Arm
//   Vec8    8      avx2: AVX2 + FMA + F16C  avx512's half-width vector
//   Vec16   16     avx512: F, BW, VL, DQ
// `Vec` is the ISA's widest (`VecU64`, `VecU64Sum`, `VecI32` its integer lanes), `kGemm*` its register
// blocking. Every type has the same operations: zero, broadcast, load (float, c10::Half, c10::BFloat16 and the
// KvCode<F> of core/kv_quant.h: int8 and fp8 codes, converted exactly as torch converts them), load_packed<kBits>
// (KIVI's int4 / int2 codes, packed little-endian: lane i from bits [i * kBits, (i + 1) * kBits)), store, + - *, fmadd,
// max, min, hsum, hsums (the sums of kSize vectors as one), hmax, exp, hide (-inf where a visibility byte is 0),
// any_nan and first_equal (the first lane equal to a value, or -1). Beside each, the integer lanes of the fixed-point
// sampling kernels (core/acceptance.h, core/sampling.h): U64x<n> (uint64 weights: fixed_weights, scaled_residual,
// keep_at_least), U64Sum<n> (a sum of such: +, hsum), I32x<n> (int32 bins or uint32 order keys: truncate, order_keys,
// equal_lanes) and Vec<n>::Mask (not_prob, any_lane).
// AVX2 and up also have VecI16, int16 lanes (I16x<n>: int8 codes widened, queries rounded; dot_pairs, to_float).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/acceptance.h"
#include "core/dtype.h"
#include "core/kivi_quant.h"
#include "core/kv_quant.h"
#include "core/softmax.h"

#if !defined(FASTAR_ISA)
#error "cpu/vec.h is for sources compiled once per ISA (csrc/cpu/kernels/): FASTAR_ISA is not defined"
#endif

#define FASTAR_ISA_LEVEL_generic 0
#define FASTAR_ISA_LEVEL_avx2 1
#define FASTAR_ISA_LEVEL_avx512 2
#define FASTAR_ISA_LEVEL_OF(isa) FASTAR_ISA_LEVEL_##isa
#define FASTAR_ISA_LEVEL_EXPAND(isa) FASTAR_ISA_LEVEL_OF(isa)
#define FASTAR_ISA_LEVEL FASTAR_ISA_LEVEL_EXPAND(FASTAR_ISA)

#if FASTAR_ISA_LEVEL > 0
#include <immintrin.h>
#endif

#if FASTAR_ISA_LEVEL == 2
#define FASTAR_ISA_TARGET \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2\")")
#define FASTAR_ISA_TARGET_END _Pragma("GCC pop_options")
#elif FASTAR_ISA_LEVEL == 1
#define FASTAR_ISA_TARGET _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi2\")")
#define FASTAR_ISA_TARGET_END _Pragma("GCC pop_options")
#else
#define FASTAR_ISA_TARGET
#define FASTAR_ISA_TARGET_END
#endif

#define FASTAR_ISA_BEGIN FASTAR_ISA_TARGET namespace fastar::cpu::FASTAR_ISA {
#define FASTAR_ISA_END \
  }                    \
  FASTAR_ISA_TARGET_END

FASTAR_ISA_BEGIN

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}
template <KvFormat F>
inline float to_f(KvCode<F> x) {
  return kv_code_value<F>(x.bits);
}

// Calls f(T{}) with T the element type of kind: float, c10::Half or c10::BFloat16.
template <typename F>
inline void with_element_type(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kFloat32:
      return f(float{});
    case FloatKind::kFloat16:
      return f(c10::Half{});
    case FloatKind::kBFloat16:
      return f(c10::BFloat16{});
  }
}

// The float16 with bits h, exactly (F16C's conversion where the ISA has it).
inline float half_bits_to_float(uint16_t h) {
#if FASTAR_ISA_LEVEL >= 1
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}

// ---- Vec4: GCC vector extensions (any target) ------------------------------------------------------------
struct Vec4 {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  using Mask = I;  // -1 in a true lane, else 0
  static constexpr int kSize = 4;
  F v;
  Vec4() = default;
  Vec4(F x) : v(x) {}
  explicit Vec4(float x) : v(F{x, x, x, x}) {}
  static Vec4 zero() { return {F{0, 0, 0, 0}}; }
  static Vec4 broadcast(float x) { return {F{x, x, x, x}}; }
  static Vec4 broadcast(const float* p) { return broadcast(*p); }
  static Vec4 load(const float* p) {
    F r;
    std::memcpy(&r, p, sizeof(r));
    return {r};
  }
  static Vec4 load(const c10::BFloat16* p) {  // bfloat16 is the upper half of a float32
    uint16_t h[4];
    std::memcpy(h, p, sizeof(h));
    const I bits{int32_t{h[0]} << 16, int32_t{h[1]} << 16, int32_t{h[2]} << 16, int32_t{h[3]} << 16};
    return {(F)bits};
  }
  static Vec4 load(const c10::Half* p) { return {F{to_f(p[0]), to_f(p[1]), to_f(p[2]), to_f(p[3])}}; }
  template <KvFormat K>
  static Vec4 load(const KvCode<K>* p) {
    if constexpr (K == KvFormat::kInt8) {
      typedef int8_t B __attribute__((vector_size(4)));
      B b;
      std::memcpy(&b, p, sizeof(b));
      return {__builtin_convertvector(__builtin_convertvector(b, I), F)};
    } else {
      return {F{to_f(p[0]), to_f(p[1]), to_f(p[2]), to_f(p[3])}};
    }
  }
  template <int kBits>
  static Vec4 load_packed(const uint8_t* p) {
    typedef uint32_t U __attribute__((vector_size(16)));
    uint32_t w = 0;
    for (int i = 0; i < kBits / 2; ++i) w |= uint32_t{p[i]} << (8 * i);
    constexpr uint32_t m = (1u << kBits) - 1;
    const U x = (U{w, w, w, w} >> U{0, kBits, 2 * kBits, 3 * kBits}) & U{m, m, m, m};
    return {__builtin_convertvector(x, F)};
  }
  void store(float* p) const { std::memcpy(p, &v, sizeof(v)); }
};
inline Vec4 operator+(Vec4 a, Vec4 b) { return {a.v + b.v}; }
inline Vec4 operator-(Vec4 a, Vec4 b) { return {a.v - b.v}; }
inline Vec4 operator*(Vec4 a, Vec4 b) { return {a.v * b.v}; }
inline Vec4 fmadd(Vec4 a, Vec4 b, Vec4 c) { return {a.v * b.v + c.v}; }
inline Vec4 max(Vec4 a, Vec4 b) { return {a.v > b.v ? a.v : b.v}; }
inline Vec4 min(Vec4 a, Vec4 b) { return {a.v < b.v ? a.v : b.v}; }
inline float hsum(Vec4 a) { return (a.v[0] + a.v[2]) + (a.v[1] + a.v[3]); }
// Lane i: hsum(x[i]), for i < 4.
inline Vec4 hsums(const Vec4* x) {
  const Vec4::F a =
      __builtin_shufflevector(x[0].v, x[1].v, 0, 4, 1, 5) + __builtin_shufflevector(x[0].v, x[1].v, 2, 6, 3, 7);
  const Vec4::F b =
      __builtin_shufflevector(x[2].v, x[3].v, 0, 4, 1, 5) + __builtin_shufflevector(x[2].v, x[3].v, 2, 6, 3, 7);
  return {__builtin_shufflevector(a, b, 0, 1, 4, 5) + __builtin_shufflevector(a, b, 2, 3, 6, 7)};
}
inline float hmax(Vec4 a) {
  const float x = a.v[0] > a.v[2] ? a.v[0] : a.v[2], y = a.v[1] > a.v[3] ? a.v[1] : a.v[3];
  return x > y ? x : y;
}
// Nearest integer for |x| < 2^22 (ties to even), as a float.
inline Vec4 round_nearest(Vec4 x) {
  const Vec4::F magic = Vec4::broadcast(12582912.0f).v;  // 1.5 * 2^23
  return {(x.v + magic) - magic};
}
// 2^n for integral n in [-126, 127].
inline Vec4 pow2(Vec4 n) { return {(Vec4::F)((__builtin_convertvector(n.v, Vec4::I) + 127) << 23)}; }
inline Vec4 zero_below(Vec4 y, Vec4 x, float t) {  // 0 where x < t, else y (NaN lanes of x keep y)
  return {(Vec4::F)((Vec4::I)y.v & ~(x.v < Vec4::broadcast(t).v))};
}
inline bool any_nan(Vec4 x) {
  const Vec4::I nan = x.v != x.v;
  return (nan[0] | nan[1] | nan[2] | nan[3]) != 0;
}
inline int first_equal(Vec4 x, float value) {
  for (int i = 0; i < 4; ++i)
    if (x.v[i] == value) return i;
  return -1;
}
// x with -inf in lane i where vis[i] == 0, for i < n, and in every lane i >= n.
inline Vec4 hide(Vec4 x, const uint8_t* vis, int n) {
  const Vec4::I seen{n > 0 && vis[0], n > 1 && vis[1], n > 2 && vis[2], n > 3 && vis[3]};
  return {seen != 0 ? x.v : Vec4::broadcast(kNegInf).v};
}

// The online softmax's primitives (core/softmax.h) on one row per lane: max propagating a NaN of either side,
// a lane mask of -inf, and a select by such a mask.
inline Vec4 softmax_max(Vec4 a, Vec4 b) { return {(a.v > b.v) | (a.v != a.v) ? a.v : b.v}; }
inline Vec4::I softmax_is_neg_inf(Vec4 x) { return x.v == Vec4::broadcast(kNegInf).v; }
inline Vec4 softmax_where(Vec4::I c, Vec4 a, Vec4 b) { return {c ? a.v : b.v}; }

// ---- Vec4's integer lanes --------------------------------------------------------------------------------
struct U64x4 {
  typedef uint64_t U __attribute__((vector_size(16)));
  U lo, hi;  // lanes 0-1, 2-3
  static U64x4 load(const uint64_t* p) {
    U64x4 r;
    std::memcpy(&r.lo, p, sizeof(r.lo));
    std::memcpy(&r.hi, p + 2, sizeof(r.hi));
    return r;
  }
  void store(uint64_t* p) const {
    std::memcpy(p, &lo, sizeof(lo));
    std::memcpy(p + 2, &hi, sizeof(hi));
  }
};
struct I32x4 {
  Vec4::I v;
  template <typename T>  // int32_t or uint32_t
  static I32x4 load(const T* p) {
    I32x4 r;
    std::memcpy(&r.v, p, sizeof(r.v));
    return r;
  }
  template <typename T>
  void store(T* p) const {
    std::memcpy(p, &v, sizeof(v));
  }
};
struct U64Sum4 {  // a sum of U64x4, folded to 2 lanes
  U64x4::U v;
  static U64Sum4 zero() { return {U64x4::U{0, 0}}; }
};
inline U64Sum4 operator+(U64Sum4 s, U64x4 w) { return {s.v + (w.lo + w.hi)}; }
inline uint64_t hsum(U64Sum4 s) { return s.v[0] + s.v[1]; }
// accept::fixed_weight of every lane: max(x, 0) (NaN -> 0) times 2^40, rounded to nearest even via 2^52.
inline U64x4 fixed_weights(Vec4 x) {
  typedef float F2 __attribute__((vector_size(8)));
  typedef double D __attribute__((vector_size(16)));
  const Vec4::F w = x.v > Vec4::zero().v ? x.v : Vec4::zero().v;
  auto fixed = [](F2 h) {
    return (U64x4::U)(__builtin_convertvector(h, D) * accept::kFixedScale + accept::kRoundMagic) -
           accept::kRoundMagicBits;
  };
  return {fixed(__builtin_shufflevector(w, w, 0, 1)), fixed(__builtin_shufflevector(w, w, 2, 3))};
}
// max(w - accept::scaled_weight(q, mass), 0) per lane: a draft row taken from fixed-point weights of total mass
// (below 2^52, as core/tree_acceptance.h keeps them).
inline U64x4 scaled_residual(U64x4 w, Vec4 q, double mass) {
  typedef float F2 __attribute__((vector_size(8)));
  typedef double D __attribute__((vector_size(16)));
  auto sub = [&](U64x4::U wv, F2 h) {
    const U64x4::U s = __builtin_convertvector(__builtin_convertvector(h, D) * mass, U64x4::U);  // truncates
    return wv > s ? wv - s : U64x4::U{0, 0};
  };
  return {sub(w.lo, __builtin_shufflevector(q.v, q.v, 0, 1)), sub(w.hi, __builtin_shufflevector(q.v, q.v, 2, 3))};
}
inline U64x4 keep_at_least(U64x4 w, I32x4 key, uint32_t tau) {  // w where key >= tau (unsigned), else 0
  typedef uint32_t U32 __attribute__((vector_size(16)));
  typedef int32_t I2 __attribute__((vector_size(8)));
  typedef int64_t I64 __attribute__((vector_size(16)));
  const Vec4::I keep = (U32)key.v >= tau;
  const I2 lo = __builtin_shufflevector(keep, keep, 0, 1), hi = __builtin_shufflevector(keep, keep, 2, 3);
  return {w.lo & (U64x4::U) __builtin_convertvector(lo, I64), w.hi & (U64x4::U) __builtin_convertvector(hi, I64)};
}
inline I32x4 truncate(Vec4 x) { return {__builtin_convertvector(x.v, Vec4::I)}; }  // toward 0; in int32 range
// sampling::order_key of every lane: -0 + 0 is +0; negative floats flip every bit, the others the sign bit.
inline I32x4 order_keys(Vec4 x) {
  const Vec4::I u = (Vec4::I)(x.v + Vec4::zero().v);
  return {u ^ ((u >> 31) | INT32_MIN)};
}
inline unsigned equal_lanes(I32x4 a, int32_t b) {  // bit i set where lane i equals b
  const Vec4::I e = a.v == b;
  return (e[0] & 1) | (e[1] & 2) | (e[2] & 4) | (e[3] & 8);
}
// Lanes where x is not a probability (accept::prob_ok false: NaN, < 0 or > 1).
inline Vec4::Mask not_prob(Vec4 x) { return ~((x.v >= Vec4::zero().v) & (x.v <= Vec4::broadcast(1.0f).v)); }
inline bool any_lane(Vec4::Mask m) { return ((m[0] | m[1]) | (m[2] | m[3])) != 0; }

#if FASTAR_ISA_LEVEL >= 1
// ---- Vec8: AVX2 ------------------------------------------------------------------------------------------
struct Vec8 {
  using Mask = __m256i;  // all ones in a true lane, else 0
  static constexpr int kSize = 8;
  __m256 v;
  Vec8() = default;
  Vec8(__m256 x) : v(x) {}
  explicit Vec8(float x) : v(_mm256_set1_ps(x)) {}
  static Vec8 zero() { return {_mm256_setzero_ps()}; }
  static Vec8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec8 broadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
  static Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec8 load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static Vec8 load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  // fp8 codes go through float16, which holds each exactly (F16C converts its subnormals, whatever MXCSR says):
  // an e5m2 code is a float16's high byte; an e4m3fn code's 7 low bits are a float16's exponent and mantissa at
  // an exponent bias 8 higher, and its NaN (0x7f, 0xff) reads as +-480, made torch's NaN by setting the exponent.
  template <KvFormat K>
  static Vec8 load(const KvCode<K>* p) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (K == KvFormat::kInt8) {
      return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))};
    } else if constexpr (K == KvFormat::kFp8E5M2) {
      return {_mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8))};
    } else {
      const __m128i half = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7), _mm_set1_epi16(-0x4001));
      const __m256 x = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.0f));
      const __m256 nan = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(480.0f), _CMP_EQ_OQ);
      return {_mm256_or_ps(x, _mm256_and_ps(nan, _mm256_set1_ps(std::numeric_limits<float>::infinity())))};
    }
  }
  template <int kBits>
  static Vec8 load_packed(const uint8_t* p) {
    uint32_t w = 0;
    std::memcpy(&w, p, kBits);  // 8 codes: kBits bytes
    const __m256i shift =
        kBits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28) : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i x = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)), shift);
    return {_mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32((1 << kBits) - 1)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline Vec8 operator+(Vec8 a, Vec8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec8 operator-(Vec8 a, Vec8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec8 operator*(Vec8 a, Vec8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec8 max(Vec8 a, Vec8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec8 min(Vec8 a, Vec8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline float hsum(Vec8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// Lane i: hsum(x[i]), for i < 8: a tree of horizontal adds.
inline Vec8 hsums(const Vec8* x) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(x[0].v, x[1].v), _mm256_hadd_ps(x[2].v, x[3].v));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(x[4].v, x[5].v), _mm256_hadd_ps(x[6].v, x[7].v));
  return {_mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31))};
}
inline float hmax(Vec8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vec8 round_nearest(Vec8 x) { return {_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec8 pow2(Vec8 n) {
  return {
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23))};
}
inline Vec8 zero_below(Vec8 y, Vec8 x, float t) {
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(t), _CMP_LT_OQ), y.v)};
}
inline bool any_nan(Vec8 x) { return _mm256_movemask_ps(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q)) != 0; }
inline int first_equal(Vec8 x, float value) {
  const int hits = _mm256_movemask_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(value), _CMP_EQ_OQ));
  return hits ? __builtin_ctz(hits) : -1;
}
inline Vec8 softmax_max(Vec8 a, Vec8 b) {
  return {_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), _mm256_add_ps(a.v, b.v), _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q))};
}
inline __m256 softmax_is_neg_inf(Vec8 x) { return _mm256_cmp_ps(x.v, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ); }
inline Vec8 softmax_where(__m256 c, Vec8 a, Vec8 b) { return {_mm256_blendv_ps(b.v, a.v, c)}; }
inline Vec8 hide(Vec8 x, const uint8_t* vis, int n) {
  uint64_t bytes = 0;
  if (n >= 8)
    std::memcpy(&bytes, vis, 8);
  else
    for (int i = 0; i < n; ++i) bytes |= static_cast<uint64_t>(vis[i]) << (8 * i);
  const __m256i hidden =
      _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes))), _mm256_setzero_si256());
  return {_mm256_blendv_ps(x.v, _mm256_set1_ps(kNegInf), _mm256_castsi256_ps(hidden))};
}

// ---- Vec8's integer lanes --------------------------------------------------------------------------------
struct U64x8 {
  __m256i lo, hi;  // lanes 0-3, 4-7
  static U64x8 load(const uint64_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4))};
  }
  void store(uint64_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 4), hi);
  }
};
struct I32x8 {
  __m256i v;
  static I32x8 zero() { return {_mm256_setzero_si256()}; }
  template <typename T>  // int32_t or uint32_t
  static I32x8 load(const T* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
  }
  template <typename T>
  void store(T* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
};
// 16 int16 lanes: int8 codes widened, or queries rounded to int16 (store_rounded); dot_pairs adds to each int32
// lane of acc the products of its two int16 lanes (the int8 decode's logits: attention.cpp).
struct I16x16 {
  static constexpr int kSize = 16;
  __m256i v;
  static I16x16 load(const int16_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
  static I16x16 widen(const KvCode<KvFormat::kInt8>* p) {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
};
inline I32x8 dot_pairs(I16x16 a, I16x16 b, I32x8 acc) { return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(a.v, b.v))}; }
inline Vec8 to_float(I32x8 x) { return {_mm256_cvtepi32_ps(x.v)}; }
inline void store_rounded(Vec8 x, int16_t* p) {  // lanes rounded to nearest (even), saturated to int16
  const __m256i i = _mm256_cvtps_epi32(x.v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}
struct U64Sum8 {  // a sum of U64x8, folded to 4 lanes
  __m256i v;
  static U64Sum8 zero() { return {_mm256_setzero_si256()}; }
};
inline U64Sum8 operator+(U64Sum8 s, U64x8 w) { return {_mm256_add_epi64(s.v, _mm256_add_epi64(w.lo, w.hi))}; }
inline uint64_t hsum(U64Sum8 s) {
  const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s.v), _mm256_extracti128_si256(s.v, 1));
  return static_cast<uint64_t>(_mm_cvtsi128_si64(h)) + static_cast<uint64_t>(_mm_extract_epi64(h, 1));
}
inline U64x8 fixed_weights(Vec8 x) {
  const __m256 w = _mm256_max_ps(x.v, _mm256_setzero_ps());  // NaN -> 0
  const __m256d scale = _mm256_set1_pd(accept::kFixedScale), magic = _mm256_set1_pd(accept::kRoundMagic);
  const __m256i magic_bits = _mm256_set1_epi64x(static_cast<int64_t>(accept::kRoundMagicBits));
  const __m256d lo = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)), scale), magic);
  const __m256d hi = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)), scale), magic);
  return {_mm256_sub_epi64(_mm256_castpd_si256(lo), magic_bits), _mm256_sub_epi64(_mm256_castpd_si256(hi), magic_bits)};
}
inline U64x8 scaled_residual(U64x8 w, Vec8 q, double mass) {
  const __m256d m = _mm256_set1_pd(mass), magic = _mm256_set1_pd(accept::kRoundMagic);
  const __m256i magic_bits = _mm256_set1_epi64x(static_cast<int64_t>(accept::kRoundMagicBits));
  auto sub = [&](__m256i wv, __m128 h) {  // trunc(q * mass) < 2^52: exact through the 2^52 magic
    const __m256d t = _mm256_round_pd(_mm256_mul_pd(_mm256_cvtps_pd(h), m), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256i sw = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(t, magic)), magic_bits);
    return _mm256_andnot_si256(_mm256_cmpgt_epi64(sw, wv), _mm256_sub_epi64(wv, sw));  // weights below 2^63
  };
  return {sub(w.lo, _mm256_castps256_ps128(q.v)), sub(w.hi, _mm256_extractf128_ps(q.v, 1))};
}
inline U64x8 keep_at_least(U64x8 w, I32x8 key, uint32_t tau) {
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(key.v, _mm256_set1_epi32(static_cast<int32_t>(tau))), key.v);
  return {_mm256_and_si256(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(keep)), w.lo),
          _mm256_and_si256(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(keep, 1)), w.hi)};
}
inline I32x8 truncate(Vec8 x) { return {_mm256_cvttps_epi32(x.v)}; }
inline I32x8 order_keys(Vec8 x) {
  const __m256i u = _mm256_castps_si256(_mm256_add_ps(x.v, _mm256_setzero_ps()));
  return {_mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32(INT32_MIN)))};
}
inline unsigned equal_lanes(I32x8 a, int32_t b) {
  return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a.v, _mm256_set1_epi32(b))));
}
inline Vec8::Mask not_prob(Vec8 x) {
  return _mm256_castps_si256(_mm256_or_ps(_mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_NGE_UQ),
                                          _mm256_cmp_ps(x.v, _mm256_set1_ps(1.0f), _CMP_NLE_UQ)));
}
inline bool any_lane(Vec8::Mask m) { return !_mm256_testz_si256(m, m); }

// In-place transpose of an 8x8 float block.
inline void transpose8x8(Vec8 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i].v, r[i + 1].v);
    t[i + 1] = _mm256_unpackhi_ps(r[i].v, r[i + 1].v);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i].v = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4].v = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

#if FASTAR_ISA_LEVEL >= 2
// ---- Vec16: AVX-512 --------------------------------------------------------------------------------------
struct Vec16 {
  using Mask = __mmask16;  // bit i: lane i
  static constexpr int kSize = 16;
  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}
  explicit Vec16(float x) : v(_mm512_set1_ps(x)) {}
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec16 broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16 load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static Vec16 load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
  }
  template <KvFormat K>  // as Vec8's
  static Vec16 load(const KvCode<K>* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (K == KvFormat::kInt8) {
      return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))};
    } else if constexpr (K == KvFormat::kFp8E5M2) {
      return {_mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8))};
    } else {
      const __m256i half =
          _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7), _mm256_set1_epi16(-0x4001));
      const __m512i x = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0f)));
      const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_or_si128(bytes, _mm_set1_epi8(-128)), _mm_set1_epi8(-1));
      return {_mm512_castsi512_ps(_mm512_mask_or_epi32(x, nan, x, _mm512_set1_epi32(0x7f800000)))};
    }
  }
  template <int kBits>
  static Vec16 load_packed(const uint8_t* p) {  // lanes 0-7 from the first 32 bits, 8-15 from the next (int4)
    uint64_t w = 0;
    std::memcpy(&w, p, 2 * kBits);  // 16 codes: 2 * kBits bytes
    const __m512i x =
        kBits == 4 ? _mm512_srlv_epi32(
                         _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                  _mm512_set1_epi64(static_cast<int64_t>(w))),
                         _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28))
                   : _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int32_t>(w)),
                                       _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    return {_mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32((1 << kBits) - 1)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline Vec16 operator+(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec16 operator-(Vec16 a, Vec16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec16 operator*(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec16 max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec16 min(Vec16 a, Vec16 b) { return {_mm512_min_ps(a.v, b.v)}; }
// The low half by extractf32x8, not castps512_ps256: GCC 12 warns of an uninitialized value in the cast where
// these are inlined.
inline float hsum(Vec16 a) {
  return hsum(Vec8{_mm256_add_ps(_mm512_extractf32x8_ps(a.v, 0), _mm512_extractf32x8_ps(a.v, 1))});
}
// Lane i: hsum(x[i]), for i < 16: pairs of vectors halved four times (each step adds the two halves of every
// vector's remaining lanes), then one permutation from lane 4 (i % 4) + i / 4.
inline Vec16 hsums(const Vec16* x) {
  __m512 y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)  // quarters: x[2i] (q0 + q2, q1 + q3), then x[2i + 1]'s
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i].v, x[2 * i + 1].v, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(x[2 * i].v, x[2 * i + 1].v, _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // quarter j: 4 lanes of x[4i + j]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // quarter j: 2 lanes of x[8i + j], then 2 of x[8i + 4 + j]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 4j + m: x[4m + j]'s sum.
  const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v)};
}
inline float hmax(Vec16 a) {
  return hmax(Vec8{_mm256_max_ps(_mm512_extractf32x8_ps(a.v, 0), _mm512_extractf32x8_ps(a.v, 1))});
}
inline Vec16 round_nearest(Vec16 x) {
  return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Vec16 pow2(Vec16 n) {
  return {
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}
inline Vec16 zero_below(Vec16 y, Vec16 x, float t) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(t), _CMP_NLT_UQ), y.v)};
}
inline bool any_nan(Vec16 x) { return _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q) != 0; }
inline int first_equal(Vec16 x, float value) {
  const unsigned hits = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(value), _CMP_EQ_OQ);
  return hits ? __builtin_ctz(hits) : -1;
}
inline Vec16 softmax_max(Vec16 a, Vec16 b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q), _mm512_max_ps(a.v, b.v),
                               _mm512_add_ps(a.v, b.v))};
}
inline __mmask16 softmax_is_neg_inf(Vec16 x) { return _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ); }
inline Vec16 softmax_where(__mmask16 c, Vec16 a, Vec16 b) { return {_mm512_mask_blend_ps(c, b.v, a.v)}; }
inline Vec16 hide(Vec16 x, const uint8_t* vis, int n) {
  const __mmask16 lanes = n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  const __m128i bytes = _mm_maskz_loadu_epi8(lanes, vis);
  const __mmask16 seen = _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0xff));
  return {_mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), seen, x.v)};
}

// ---- Vec16's integer lanes -------------------------------------------------------------------------------
struct U64x16 {
  __m512i lo, hi;  // lanes 0-7, 8-15
  static U64x16 load(const uint64_t* p) { return {_mm512_loadu_si512(p), _mm512_loadu_si512(p + 8)}; }
  void store(uint64_t* p) const {
    _mm512_storeu_si512(p, lo);
    _mm512_storeu_si512(p + 8, hi);
  }
};
struct I32x16 {
  __m512i v;
  static I32x16 zero() { return {_mm512_setzero_si512()}; }
  template <typename T>  // int32_t or uint32_t
  static I32x16 load(const T* p) {
    return {_mm512_loadu_si512(p)};
  }
  template <typename T>
  void store(T* p) const {
    _mm512_storeu_si512(p, v);
  }
};
struct I16x32 {  // as I16x16
  static constexpr int kSize = 32;
  __m512i v;
  static I16x32 load(const int16_t* p) { return {_mm512_loadu_si512(p)}; }
  static I16x32 widen(const KvCode<KvFormat::kInt8>* p) {
    return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
};
inline I32x16 dot_pairs(I16x32 a, I16x32 b, I32x16 acc) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(a.v, b.v))};
}
inline Vec16 to_float(I32x16 x) { return {_mm512_cvtepi32_ps(x.v)}; }
inline void store_rounded(Vec16 x, int16_t* p) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x.v)));
}
struct U64Sum16 {  // a sum of U64x16, folded to 8 lanes
  __m512i v;
  static U64Sum16 zero() { return {_mm512_setzero_si512()}; }
};
inline U64Sum16 operator+(U64Sum16 s, U64x16 w) { return {_mm512_add_epi64(s.v, _mm512_add_epi64(w.lo, w.hi))}; }
inline uint64_t hsum(U64Sum16 s) {
  return hsum(U64Sum8{_mm256_add_epi64(_mm512_extracti32x8_epi32(s.v, 0), _mm512_extracti32x8_epi32(s.v, 1))});
}
inline U64x16 fixed_weights(Vec16 x) {
  const __m512 w = _mm512_max_ps(x.v, _mm512_setzero_ps());  // NaN -> 0
  const __m512d scale = _mm512_set1_pd(accept::kFixedScale), magic = _mm512_set1_pd(accept::kRoundMagic);
  const __m512i magic_bits = _mm512_set1_epi64(static_cast<int64_t>(accept::kRoundMagicBits));
  const __m512d lo = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(w)), scale), magic);
  const __m512d hi = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(w, 1)), scale), magic);
  return {_mm512_sub_epi64(_mm512_castpd_si512(lo), magic_bits), _mm512_sub_epi64(_mm512_castpd_si512(hi), magic_bits)};
}
inline U64x16 scaled_residual(U64x16 w, Vec16 q, double mass) {
  const __m512d m = _mm512_set1_pd(mass);
  auto sub = [&](__m512i wv, __m256 h) {
    const __m512i sw = _mm512_cvttpd_epu64(_mm512_mul_pd(_mm512_cvtps_pd(h), m));
    return _mm512_sub_epi64(wv, _mm512_min_epu64(wv, sw));
  };
  return {sub(w.lo, _mm512_castps512_ps256(q.v)), sub(w.hi, _mm512_extractf32x8_ps(q.v, 1))};
}
inline U64x16 keep_at_least(U64x16 w, I32x16 key, uint32_t tau) {
  const __mmask16 keep = _mm512_cmpge_epu32_mask(key.v, _mm512_set1_epi32(static_cast<int32_t>(tau)));
  return {_mm512_maskz_mov_epi64(static_cast<__mmask8>(keep), w.lo),
          _mm512_maskz_mov_epi64(static_cast<__mmask8>(keep >> 8), w.hi)};
}
inline I32x16 truncate(Vec16 x) { return {_mm512_cvttps_epi32(x.v)}; }
inline I32x16 order_keys(Vec16 x) {
  const __m512i u = _mm512_castps_si512(_mm512_add_ps(x.v, _mm512_setzero_ps()));
  return {_mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(INT32_MIN)))};
}
inline unsigned equal_lanes(I32x16 a, int32_t b) { return _mm512_cmpeq_epi32_mask(a.v, _mm512_set1_epi32(b)); }
inline Vec16::Mask not_prob(Vec16 x) {
  return _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NGE_UQ) |
         _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(1.0f), _CMP_NLE_UQ);
}
inline bool any_lane(Vec16::Mask m) { return m != 0; }
#endif

// exp of every lane (relative error ~2e-7): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in two parts
// (Cody-Waite), e^r by a degree-6 polynomial. Lanes below -87.3 (and -inf) give exactly 0, NaN lanes NaN
// (max and min return their second operand when one is NaN, as the x86 instructions do).
template <typename V>
inline V exp(V x) {
  const V xc = min(V::broadcast(88.3f), max(V::broadcast(-87.3f), x));
  const V n = round_nearest(xc * V::broadcast(1.44269504088896341f));
  V r = fmadd(n, V::broadcast(-0.693359375f), xc);
  r = fmadd(n, V::broadcast(2.12194440e-4f), r);
  V y = V::broadcast(1.9875691500e-4f);
  y = fmadd(y, r, V::broadcast(1.3981999507e-3f));
  y = fmadd(y, r, V::broadcast(8.3334519073e-3f));
  y = fmadd(y, r, V::broadcast(4.1665795894e-2f));
  y = fmadd(y, r, V::broadcast(1.6666665459e-1f));
  y = fmadd(y, r, V::broadcast(5.0000001201e-1f));
  y = fmadd(y, r * r, r + V::broadcast(1.0f));
  return zero_below(y * pow2(n), x, -87.3f);
}

// The online softmax state (core/softmax_state.inc) compiled for this ISA: over float, with the scalar
// primitives of core/softmax.h, or over a vector type, one row per lane.
template <typename V>
inline V softmax_exp(V x) {
  return exp(x);
}
using ::fastar::softmax_exp;
using ::fastar::softmax_exp2;
using ::fastar::softmax_is_neg_inf;
using ::fastar::softmax_is_zero;
using ::fastar::softmax_log;
using ::fastar::softmax_log2;
using ::fastar::softmax_max;
using ::fastar::softmax_where;
#include "core/softmax_state.inc"  // NOLINT: included inside the ISA's namespace

// The ISA's widest vector, its integer lanes, and the register blocking of its GEMM micro-kernels
// (csrc/cpu/kernels/gemm.h): blocks of kGemmRows rows x kGemmVecs vectors, kGemmRows * kGemmVecs accumulators
// in registers.
#if FASTAR_ISA_LEVEL == 2
using Vec = Vec16;
using VecU64 = U64x16;
using VecU64Sum = U64Sum16;
using VecI32 = I32x16;
using VecI16 = I16x32;
constexpr int kGemmRows = 12, kGemmVecs = 2;  // 24 of 32 registers
#elif FASTAR_ISA_LEVEL == 1
using Vec = Vec8;
using VecU64 = U64x8;
using VecU64Sum = U64Sum8;
using VecI32 = I32x8;
using VecI16 = I16x16;
constexpr int kGemmRows = 6, kGemmVecs = 2;  // 12 of 16: both FMA pipes busy through the FMA latency
#else
using Vec = Vec4;
using VecU64 = U64x4;
using VecU64Sum = U64Sum4;
using VecI32 = I32x4;
constexpr int kGemmRows = 1, kGemmVecs = 8;  // 8 accumulators, 1 broadcast (a load and a shuffle) per 64 flops
#endif
constexpr int kW = Vec::kSize;

FASTAR_ISA_END
