// AMX-BF16 for the attention kernel's GEMM path (the avx512 copy only; the other ISAs compile none of it): whether
// the CPU and the OS run AMX, the tile configuration, and the bf16 products with float accumulation that the path
// computes on tiles, with the AVX-512 (BF16) packing of their operands.
#pragma once
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <cstdint>
#include <cstdlib>

#include "cpu/vec.h"

FASTAR_ISA_BEGIN
#if FASTAR_ISA_LEVEL >= 2
#define FASTAR_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,avx512bf16,amx-tile,amx-bf16")))

// Whether AMX-BF16 (and AVX512-BF16) run here: the CPU has them and Linux lets this process use the tile data
// (asked once). FASTAR_CPU_AMX=0 turns the AMX path off (tests and benchmarks compare it with the float32 path).
inline bool amx_usable() {
  static const bool runs = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1) || !(d >> 24 & 1)) return false;  // AMX-BF16, -TILE
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;                     // AVX512-BF16
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;  // other systems: not asked for here
#endif
  }();
  const char* env = std::getenv("FASTAR_CPU_AMX");
  return runs && !(env && env[0] == '0');
}

// The calling thread's tiles: 8 of 16 rows x 64 bytes (palette 1). Configure before amx_gemm, release after.
FASTAR_AMX_TARGET inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes of cfg: the barrier keeps the other stores.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
FASTAR_AMX_TARGET inline void amx_release() { _tile_release(); }

// A block of RT x CT tiles of C (16 x 16 floats each) at c: C (+)= A B over k < K, A's RT x 16 rows of bf16 at a
// (lda elements apart), B's pairs of rows (b: rows k and k + 1 of CT x 16 columns as 32-bit words (B[k][n],
// B[k + 1][n]), ldb words apart). Tiles: C 0-3, A 4-5, B 6-7.
template <int RT, int CT, bool kAccumulate>
FASTAR_AMX_TARGET inline void amx_block(int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                        float* c, int64_t ldc) {
  const int64_t sc = ldc * 4, sa = lda * 2, sb = ldb * 4;
  if constexpr (kAccumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (CT > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (RT > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (RT > 1 && CT > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (CT > 1) _tile_zero(1);
    if constexpr (RT > 1) _tile_zero(2);
    if constexpr (RT > 1 && CT > 1) _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, a + k, sa);
    if constexpr (RT > 1) _tile_loadd(5, a + 16 * lda + k, sa);
    _tile_loadd(6, b + k / 2 * ldb, sb);
    if constexpr (CT > 1) _tile_loadd(7, b + k / 2 * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (CT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RT > 1 && CT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  if constexpr (CT > 1) _tile_stored(1, c + 16, sc);
  if constexpr (RT > 1) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (RT > 1 && CT > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// C[M x N] (+)= A[M x K] B[K x N] in float (products of bf16 are exact; sums in float), operands as amx_block's;
// M and N multiples of 16, K of 32.
template <bool kAccumulate>
FASTAR_AMX_TARGET inline void amx_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda,
                                       const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t m = 0; m < M; m += 32) {
    const bool two_rows = m + 32 <= M;
    for (int64_t n = 0; n < N; n += 32) {
      const uint16_t* am = a + m * lda;
      const uint32_t* bn = b + n;
      float* cmn = c + m * ldc + n;
      if (n + 32 <= N) {
        if (two_rows)
          amx_block<2, 2, kAccumulate>(K, am, lda, bn, ldb, cmn, ldc);
        else
          amx_block<1, 2, kAccumulate>(K, am, lda, bn, ldb, cmn, ldc);
      } else {
        if (two_rows)
          amx_block<2, 1, kAccumulate>(K, am, lda, bn, ldb, cmn, ldc);
        else
          amx_block<1, 1, kAccumulate>(K, am, lda, bn, ldb, cmn, ldc);
      }
    }
  }
}

// Lanes [i, i + 16) of a row of n: all, the first n - i, or none.
inline __mmask16 row_lanes(int64_t i, int64_t n) {
  return i >= n ? 0 : i + 16 <= n ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
}

// dst[0..n_pad) = bf16(x[i] * scale[i]) (scale null: 1) for i < n, then 0, rounded to nearest even (exact for
// values bf16 holds, as int8 and fp8 codes); n_pad a multiple of 32. dst may be x's own storage: each 32 values
// are read before their bf16 halves are written.
FASTAR_AMX_TARGET inline void to_bf16_row(const float* x, const float* scale, int64_t n, int64_t n_pad, uint16_t* dst) {
  for (int64_t i = 0; i < n_pad; i += 32) {
    const __mmask16 lo = row_lanes(i, n), hi = row_lanes(i + 16, n);
    __m512 a = _mm512_maskz_loadu_ps(lo, x + i), b = _mm512_maskz_loadu_ps(hi, x + i + 16);
    if (scale) {
      a = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(lo, scale + i));
      b = _mm512_mul_ps(b, _mm512_maskz_loadu_ps(hi, scale + i + 16));
    }
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  }
}

// The max of init and x[i] * scale[i] (scale null: 1) for i < n; lane-wise max(m, x) as max_of takes it.
inline float scaled_max(const float* x, const float* scale, int64_t n, float init) {
  __m512 m = _mm512_set1_ps(init);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = row_lanes(i, n);
    __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, scale + i));
    m = _mm512_mask_max_ps(m, k, m, v);
  }
  return hmax(Vec16{m});
}

// A row's softmax weights e[i] = exp(x[i] * scale[i] - shift) (scale null: 1) for i < n: returns their sum, and
// writes dst[0..n_pad) = bf16(e[i] * weight[i]), then 0; n_pad a multiple of 32, dst may be x's storage (as
// to_bf16_row's).
FASTAR_AMX_TARGET inline float exp_to_bf16_row(const float* x, const float* scale, float shift, const float* weight,
                                               int64_t n, int64_t n_pad, uint16_t* dst) {
  const Vec16 sv = Vec16::broadcast(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n_pad; i += 32) {
    __m512 e[2];
    for (int h = 0; h < 2; ++h) {
      const __mmask16 k = row_lanes(i + 16 * h, n);
      __m512 v = _mm512_maskz_loadu_ps(k, x + i + 16 * h);
      if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, scale + i + 16 * h));
      e[h] = _mm512_maskz_mov_ps(k, exp(Vec16{v} - sv).v);
      sum = _mm512_add_ps(sum, e[h]);
      e[h] = _mm512_mul_ps(e[h], _mm512_maskz_loadu_ps(k, weight + i + 16 * h));
    }
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
  }
  return hsum(Vec16{sum});
}

// The pairs of rows of B for amx_block from rows of bf16 [n, D] (ld elements apart), n a multiple of 2, D of 16:
// dst[(k / 2) * D + d] = (rows[k][d], rows[k + 1][d]).
FASTAR_AMX_TARGET inline void interleave_row_pairs(const uint16_t* rows, int64_t ld, int64_t n, int64_t D,
                                                   uint32_t* dst) {
  for (int64_t k = 0; k < n; k += 2) {
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i x0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + k * ld + d)));
      const __m512i x1 =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + (k + 1) * ld + d)));
      _mm512_storeu_si512(dst + k / 2 * D + d, _mm512_or_si512(x0, _mm512_slli_epi32(x1, 16)));
    }
  }
}

// The pairs of rows of B = X^T for amx_block from rows of bf16 X [n, D] (ld elements apart), n a multiple of 16, D
// of 32: dst[(d / 2) * n + j] = (X[j][d], X[j][d + 1]), 16 x 16 blocks of 32-bit words transposed in registers.
FASTAR_AMX_TARGET inline void transpose_row_pairs(const uint16_t* rows, int64_t ld, int64_t n, int64_t D,
                                                  uint32_t* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
      __m512i r[16], t[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(rows + (j0 + j) * ld + 2 * p0);
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      // r[4i + j]: in 128-bit lane L, word 4L + j of rows 4i .. 4i + 3.
      for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      for (int j = 0; j < 4; ++j) {
        const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        const __m512i y0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        const __m512i y1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
        uint32_t* out = dst + (p0 + j) * n + j0;
        _mm512_storeu_si512(out, _mm512_shuffle_i32x4(x0, y0, 0x88));
        _mm512_storeu_si512(out + 4 * n, _mm512_shuffle_i32x4(x1, y1, 0x88));
        _mm512_storeu_si512(out + 8 * n, _mm512_shuffle_i32x4(x0, y0, 0xdd));
        _mm512_storeu_si512(out + 12 * n, _mm512_shuffle_i32x4(x1, y1, 0xdd));
      }
    }
  }
}
#endif
FASTAR_ISA_END
