// CPU kernel of fastar's masked attention: tiled online softmax (FlashAttention's recurrence) in float32.
//
// A work item is (batch, kv head, query tile, kv split). Its rows are every query head of the GQA group
// times the tile's query positions, so each K/V tile is loaded once for the whole group. Key tiles are
// classified against the structured mask first (core/attention.h): hidden tiles are skipped, fully
// visible ones run without per-element mask work. When there are too few work items for the threads
// (decode with a small batch), the keys are split and the partial results merged by their LSE.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/attention.h"
#include "cpu/vec.h"
#include "ops.h"
#include "ops/attention_args.h"

namespace fastar {
namespace {

constexpr int64_t kKeyTile = 64;
constexpr int64_t kMaxRows = 256;  // query rows (heads x positions) per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// dot(a[0..D), b[0..D)) with a in float and b in the input type.
template <typename T>
inline float dot_row(const float* a, const T* b, int64_t D) {
  int64_t d = 0;
  float s = 0.0f;
#if defined(FASTAR_CPU_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), cpu::load8(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), cpu::load8(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), cpu::load8(b + d), acc0);
  s = cpu::hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; d < D; ++d) s += a[d] * to_f(b[d]);
  return s;
}

// o[0..D) += w * v (v in the input type).
template <typename T>
inline void axpy(float* o, float w, const T* v, int64_t D) {
  int64_t d = 0;
#if defined(FASTAR_CPU_AVX2)
  const __m256 wv = _mm256_set1_ps(w);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, cpu::load8(v + d), _mm256_loadu_ps(o + d)));
#endif
  for (; d < D; ++d) o[d] += w * to_f(v[d]);
}

#if defined(FASTAR_CPU_AVX2)
// Register-blocked C[MR x 16] (=|+=) A[MR x K] * B[K x 16] (row strides lda, ldb, ldc): 8 accumulators,
// per k two loads of B and MR broadcasts of A. The GEMM path of tiles with many query rows.
template <int MR>
inline void gemm_rows_x16(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                          bool accumulate) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// C[M x N] (=|+=) A[M x K] * B[K x N] with N a multiple of 16: blocks of 4 rows, then the remaining rows.
// (6-row blocks would fill all 16 AVX2 registers on paper but spill in practice: 2.5x slower here.)
template <int MR>
inline void gemm_rows_tail(int64_t rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                           float* c, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_rows_x16<MR>(a, lda, b, ldb, K, c, ldc, accumulate);
    gemm_rows_tail<MR - 1>(rows, a, lda, b, ldb, K, c, ldc, accumulate);
  }
}

inline void gemm_x16(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kRows = 4;
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    int64_t m0 = 0;
    for (; m0 + kRows <= M; m0 += kRows)
      gemm_rows_x16<kRows>(a + m0 * lda, lda, b + n0, ldb, K, c + m0 * ldc + n0, ldc, accumulate);
    gemm_rows_tail<kRows - 1>(M - m0, a + m0 * lda, lda, b + n0, ldb, K, c + m0 * ldc + n0, ldc, accumulate);
  }
}
#endif

// Tiles with at least this many query rows use the GEMM path (K and V staged as float): compute-bound
// verification and prefill. Fewer rows (decode) stream K and V straight from memory with dot/axpy loops.
constexpr int64_t kGemmMinRows = 8;

// Running softmax state of one query row.
struct RowState {
  float m = kNegInf;  // running max of the logits
  float l = 0.0f;     // running sum of exp(logit - m)
};

// Partial result of one work item for one row, before normalisation (used to merge kv splits).
struct Partial {
  float m, l;
};

template <typename T>
class AttentionCpu {
 public:
  explicit AttentionCpu(const AttentionParams& p) : p_(p), G_(p.Hq / p.Hkv) {
    // Query positions per tile: as many as fit kMaxRows rows with the whole GQA group.
    q_tile_ = std::max<int64_t>(1, std::min<int64_t>(p.Lq, kMaxRows / G_));
    if (G_ > kMaxRows) q_tile_ = 1;
    n_q_tiles_ = (p.Lq + q_tile_ - 1) / q_tile_;
    const int64_t items = p.B * p.Hkv * n_q_tiles_;
    const int64_t key_tiles = (p.Lk + kKeyTile - 1) / kKeyTile;
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    splits_ = items >= want ? 1 : std::max<int64_t>(1, std::min<int64_t>(key_tiles / 2, (want + items - 1) / items));
  }

  void run() {
    const int64_t items = p_.B * p_.Hkv * n_q_tiles_;
    const int64_t rows_cap = G_ * q_tile_;
    if (splits_ > 1) {
      partial_o_.assign(static_cast<size_t>(items * splits_ * rows_cap * p_.D), 0.0f);
      partial_ml_.assign(static_cast<size_t>(items * splits_ * rows_cap), Partial{kNegInf, 0.0f});
    }
    at::parallel_for(0, items * splits_, 1, [&](int64_t w0, int64_t w1) {
      std::vector<float> scratch(static_cast<size_t>(rows_cap * (2 * p_.D + kKeyTile + 1) + 2 * kKeyTile * p_.D));
      for (int64_t w = w0; w < w1; ++w) run_item(w / splits_, w % splits_, scratch.data());
    });
    if (splits_ > 1) {
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t item = i0; item < i1; ++item) merge_splits(item);
      });
    }
  }

 private:
  struct Item {
    int64_t b, hkv, i0, nq;
  };

  Item item_at(int64_t item) const {
    const int64_t qt = item % n_q_tiles_, bh = item / n_q_tiles_;
    const int64_t i0 = qt * q_tile_;
    return Item{bh / p_.Hkv, bh % p_.Hkv, i0, std::min(q_tile_, p_.Lq - i0)};
  }

  // Row r of an item is query head hkv * G + r / nq at position i0 + r % nq.
  void run_item(int64_t item, int64_t split, float* scratch) {
    const Item it = item_at(item);
    const int64_t D = p_.D, R = G_ * it.nq;
    float* q = scratch;                // [R, D] queries * scale, in float
    float* o = q + R * D;              // [R, D] unnormalised output
    float* s = o + R * D;              // [R, kKeyTile] logits, then probabilities
    float* corr = s + R * kKeyTile;    // [R] rescaling of o for the current tile
    float* kt = corr + R;              // [D, kKeyTile] the key tile, transposed, in float (GEMM path)
    float* vf = kt + D * kKeyTile;     // [kKeyTile, D] the value tile in float (GEMM path)
#if defined(FASTAR_CPU_AVX2)
    const bool gemm = R >= kGemmMinRows;
#else
    const bool gemm = false;
#endif
    std::vector<RowState> st(static_cast<size_t>(R));
    const T* qbase = static_cast<const T*>(p_.q);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = it.hkv * G_ + r / it.nq, i = it.i0 + r % it.nq;
      const T* src = qbase + it.b * p_.q_sb + h * p_.q_sh + i * p_.q_sl;
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = to_f(src[d]) * p_.scale;
      std::fill(o + r * D, o + (r + 1) * D, 0.0f);
    }

    const int64_t lk = kv_len(p_, it.b);
    const MaskGeometry geom = mask_geometry(p_, it.b);
    const int64_t tiles = (lk + kKeyTile - 1) / kKeyTile;
    const int64_t per_split = (tiles + splits_ - 1) / splits_;
    const int64_t t_begin = split * per_split, t_end = std::min(tiles, t_begin + per_split);
    const T* kbase = static_cast<const T*>(p_.k);
    const T* vbase = static_cast<const T*>(p_.v);
    const T* bias = static_cast<const T*>(p_.mask.bias);

    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t j0 = t * kKeyTile, j1 = std::min(lk, j0 + kKeyTile), nk = j1 - j0;
      const TileClass cls = classify_tile(p_.mask, it.b, it.i0, it.i0 + it.nq, j0, j1, geom);
      if (cls == TileClass::kHidden) continue;
      // Logits: each key row is read once for all R rows.
      if (gemm) {
        logits_gemm(it, j0, nk, q, R, kt, s, kbase);
      } else {
        for (int64_t c = 0; c < nk; ++c) {
          const T* krow = kbase + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, j0 + c);
          for (int64_t r = 0; r < R; ++r) s[r * kKeyTile + c] = dot_row(q + r * D, krow, D);
        }
      }
      if (cls == TileClass::kPartial) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t h = it.hkv * G_ + r / it.nq, i = it.i0 + r % it.nq;
          float* srow = s + r * kKeyTile;
          const T* brow = bias ? bias + it.b * p_.mask.bias_sb + h * p_.mask.bias_sh + i * p_.mask.bias_sq : nullptr;
          for (int64_t c = 0; c < nk; ++c) {
            if (!mask_visible(p_.mask, it.b, i, j0 + c, geom)) {
              srow[c] = kNegInf;
            } else if (brow) {
              srow[c] += to_f(brow[j0 + c]);
            }
          }
        }
      }
      // Online softmax: what was accumulated so far is rescaled by exp(m_old - m_new).
      for (int64_t r = 0; r < R; ++r) {
        float* srow = s + r * kKeyTile;
        const float mx = cpu::max_of(srow, nk, kNegInf);
        RowState& rs = st[static_cast<size_t>(r)];
        if (mx == kNegInf) {  // nothing visible in this tile for this row
          std::fill(srow, srow + nk, 0.0f);
          corr[r] = 1.0f;
          continue;
        }
        const float m_new = std::max(rs.m, mx);
        corr[r] = std::exp(rs.m - m_new);  // exp(-inf) = 0 on the row's first visible tile
        rs.l = rs.l * corr[r] + cpu::exp_shift_sum(srow, nk, m_new);
        rs.m = m_new;
      }
      for (int64_t r = 0; r < R; ++r) {
        if (corr[r] != 1.0f) {
          for (int64_t d = 0; d < D; ++d) o[r * D + d] *= corr[r];
        }
      }
      // o += p v: each value row is read once for all R rows.
      if (gemm) {
        values_gemm(it, j0, nk, s, R, vf, o, vbase);
      } else {
        for (int64_t c = 0; c < nk; ++c) {
          const T* vrow = vbase + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, j0 + c);
          for (int64_t r = 0; r < R; ++r) axpy(o + r * D, s[r * kKeyTile + c], vrow, D);
        }
      }
    }
    finish_item(item, split, it, o, st.data());
  }

  // s[R, kKeyTile] = q[R, D] * K^T over the tile's nk keys (columns past nk are left arbitrary).
  void logits_gemm(const Item& it, int64_t j0, int64_t nk, const float* q, int64_t R, float* kt, float* s,
                   const T* kbase) {
#if defined(FASTAR_CPU_AVX2)
    const int64_t D = p_.D, n16 = (nk + 15) / 16 * 16, d8 = D / 8 * 8;
    const T* krows[kKeyTile];
    for (int64_t c = 0; c < nk; ++c) krows[c] = kbase + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, j0 + c);
    // Transpose (and convert) the key tile 8 keys x 8 dims at a time; zero keys past nk.
    for (int64_t c0 = 0; c0 < n16; c0 += 8) {
      if (c0 + 8 <= nk) {
        for (int64_t d0 = 0; d0 < d8; d0 += 8) {
          __m256 rows[8];
          for (int k = 0; k < 8; ++k) rows[k] = cpu::load8(krows[c0 + k] + d0);
          cpu::transpose8x8(rows);
          for (int k = 0; k < 8; ++k) _mm256_storeu_ps(kt + (d0 + k) * kKeyTile + c0, rows[k]);
        }
        for (int64_t c = c0; c < c0 + 8; ++c)
          for (int64_t d = d8; d < D; ++d) kt[d * kKeyTile + c] = to_f(krows[c][d]);
      } else {
        for (int64_t c = c0; c < c0 + 8; ++c)
          for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + c] = c < nk ? to_f(krows[c][d]) : 0.0f;
      }
    }
    gemm_x16(R, n16, D, q, D, kt, kKeyTile, s, kKeyTile, false);
#else
    (void)it, (void)j0, (void)nk, (void)q, (void)R, (void)kt, (void)s, (void)kbase;
#endif
  }

  // o[R, D] += s[R, :nk] * V over the tile. float values of a contiguous cache are used where they lie.
  void values_gemm(const Item& it, int64_t j0, int64_t nk, const float* s, int64_t R, float* vf, float* o,
                   const T* vbase) {
#if defined(FASTAR_CPU_AVX2)
    const int64_t D = p_.D, d16 = D / 16 * 16;
    const float* vt = vf;
    int64_t ldv = D;
    if constexpr (std::is_same_v<T, float>) {
      if (!p_.block_table) {
        vt = vbase + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, j0);
        ldv = p_.v_sl;
      }
    }
    if (vt == vf) {
      for (int64_t c = 0; c < nk; ++c) {
        const T* vrow = vbase + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, j0 + c);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(vf + c * D + d, cpu::load8(vrow + d));
        for (; d < D; ++d) vf[c * D + d] = to_f(vrow[d]);
      }
    }
    if (d16 > 0) gemm_x16(R, d16, nk, s, kKeyTile, vt, ldv, o, D, true);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < nk; ++c) {
        const float w = s[r * kKeyTile + c];
        for (int64_t d = d16; d < D; ++d) o[r * D + d] += w * vt[c * ldv + d];
      }
    }
#else
    (void)it, (void)j0, (void)nk, (void)s, (void)R, (void)vf, (void)o, (void)vbase;
#endif
  }

  void finish_item(int64_t item, int64_t split, const Item& it, const float* o, const RowState* st) {
    const int64_t D = p_.D, R = G_ * it.nq, rows_cap = G_ * q_tile_;
    if (splits_ > 1) {
      const int64_t base = (item * splits_ + split) * rows_cap;
      for (int64_t r = 0; r < R; ++r) {
        partial_ml_[static_cast<size_t>(base + r)] = Partial{st[r].m, st[r].l};
        std::copy(o + r * D, o + (r + 1) * D, partial_o_.begin() + (base + r) * D);
      }
      return;
    }
    for (int64_t r = 0; r < R; ++r) write_row(it, r, o + r * D, st[r].m, st[r].l);
  }

  void merge_splits(int64_t item) {
    const Item it = item_at(item);
    const int64_t D = p_.D, R = G_ * it.nq, rows_cap = G_ * q_tile_;
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t r = 0; r < R; ++r) {
      float m = kNegInf;
      for (int64_t sp = 0; sp < splits_; ++sp) m = std::max(m, partial_ml_[static_cast<size_t>((item * splits_ + sp) * rows_cap + r)].m);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      if (m != kNegInf) {
        for (int64_t sp = 0; sp < splits_; ++sp) {
          const int64_t idx = (item * splits_ + sp) * rows_cap + r;
          const Partial& pm = partial_ml_[static_cast<size_t>(idx)];
          if (pm.l == 0.0f) continue;
          const float w = std::exp(pm.m - m);
          l += pm.l * w;
          const float* po = partial_o_.data() + idx * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * po[d];
        }
      }
      write_row(it, r, acc.data(), m, l);
    }
  }

  // Normalise and store one row; a row that saw no key gets 0 and LSE -inf.
  void write_row(const Item& it, int64_t r, const float* o, float m, float l) {
    const int64_t h = it.hkv * G_ + r / it.nq, i = it.i0 + r % it.nq;
    T* dst = static_cast<T*>(p_.out) + it.b * p_.o_sb + h * p_.o_sh + i * p_.o_sl;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < p_.D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    if (p_.lse) p_.lse[(it.b * p_.Hq + h) * p_.Lq + i] = l > 0.0f ? m + std::log(l) : kNegInf;
  }

  const AttentionParams& p_;
  const int64_t G_;
  int64_t q_tile_ = 1, n_q_tiles_ = 1, splits_ = 1;
  std::vector<float> partial_o_;
  std::vector<Partial> partial_ml_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& kv_lens,
                                                 const std::optional<at::Tensor>& block_table,
                                                 const std::optional<at::Tensor>& q_block_ids,
                                                 const std::optional<at::Tensor>& k_block_ids,
                                                 const std::optional<at::Tensor>& mask_bits,
                                                 const std::optional<at::Tensor>& bias, at::IntArrayRef mask_config,
                                                 double scale) {
  AttentionLaunch l = prepare_attention(q, k, v, kv_lens, block_table, q_block_ids, k_block_ids, mask_bits, bias,
                                        mask_config, scale);
  TORCH_CHECK_VALUE(l.out.is_cpu(), "fastar.attention: expected CPU tensors");
  if (l.prm.B * l.prm.Hq * l.prm.Lq > 0) {
    dispatch_cpu_float(float_kind(l.out), [&](auto tag) { AttentionCpu<decltype(tag)>(l.prm).run(); });
  }
  return {l.out, l.lse};
}

}  // namespace fastar
