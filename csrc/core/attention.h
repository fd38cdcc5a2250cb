// Arguments and mask rules of fastar's attention kernels, shared by the CPU and CUDA kernels.
//
// A mask is an AND of optional terms, each given as structure (never as an Lq x Lk float tensor):
//   causal  key j visible iff j <= i + diag           (diag = Lk_b - Lq bottom-right, or 0 top-left)
//   window  key j visible iff i + diag - left <= j <= i + diag, or j < sinks
//   block   block ids per query and key: causal kb <= qb, same kb == qb, prev qb - 1 <= kb <= qb
//   bits    bit-packed custom mask over the last `bits_cols` keys of each sequence (earlier keys are
//           visible: the prefix of tree verification): row-major, little-endian bits, one row of
//           ceil(bits_cols / 8) bytes per query (FlashInfer's layout)
//   bias    an additive float mask (SDPA's float attn_mask), with broadcast strides
// Whole key tiles are classified first: hidden tiles are skipped, fully visible ones run without
// per-element mask work.
#pragma once
#include <cstdint>

#include "core/kv_quant.h"
#include "core/macros.h"
#include "core/softmax.h"

namespace fastar {

enum class BlockRelation : int32_t { kNone = 0, kCausal = 1, kSame = 2, kPrev = 3 };

struct AttentionMask {
  bool causal;
  bool bottom_right;  // diagonal alignment of causal and window: Lk_b - Lq (true) or 0 (SDPA's is_causal)
  bool window;
  int64_t window_left;
  int64_t window_sinks;
  BlockRelation block;
  const int32_t* q_block_ids;  // [B or 1, Lq]
  const int32_t* k_block_ids;  // [B or 1, Lk]
  int64_t q_block_sb, k_block_sb;
  const uint8_t* bits;  // [B or 1, Lq, bits_row]
  int64_t bits_sb, bits_row, bits_cols;
  const void* bias;  // element type of q; [B, H, Lq, Lk] with broadcast (0) strides, unit stride along keys
  int64_t bias_sb, bias_sh, bias_sq;
  // Next-scale local window (fastar.ScaleLayout): the block ids are scale ids, tokens carry their (y, x) on
  // their scale's grid, and a key of another scale (past the first full_scales) is visible iff its cell,
  // mapped onto the query's grid, lies within scale_window cells of the query. Query i is token
  // i + q_token_offset of k_y/k_x.
  int64_t scale_window;  // -1 = off
  int64_t full_scales, num_scales, q_token_offset;
  const int32_t* tok_y;     // [Lk]
  const int32_t* tok_x;     // [Lk]
  const int32_t* scale_hw;  // [num_scales, 2]
  // Known class of every (tile_q x tile_k) block of the [Lq, Lk] mask (TileClass values), combined with
  // the other terms: how a precomputed block-sparse map (ScaleLayout.tile_map) drives the kernels.
  const uint8_t* tile_map;
  int64_t tile_q, tile_k, tile_cols;
};

struct AttentionParams {
  // q, out: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D], all with unit stride along D, any other strides.
  // Paged caches: key position s lives in page block_table[b, s / page_size] at row s % page_size, and the
  // batch stride is the page stride.
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // [B, Hq, Lq] contiguous, natural log; null if not requested
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t o_sb, o_sh, o_sl;
  const int32_t* block_table;  // [B, max_pages] or null (contiguous)
  int64_t bt_sb, page_size, num_pages;
  const int32_t* kv_lens;  // [B] keys per sequence, or null: every sequence has Lk keys
  int64_t B, Hq, Hkv, Lq, Lk, D;
  float scale;
  // qk_norm (VAR's attn_l2_norm): q and k are L2-normalised in the kernel and q is multiplied by
  // q_scale[h] (null = 1) before the softmax scale.
  bool qk_norm;
  const float* q_scale;
  AttentionMask mask;
  // Quantized K/V (docs/quantized_kvcache.md): k and v hold one-byte codes of kv_format, and key s of head h of
  // sequence b is codes * k_scale[kv_row_offset(p, ks_sb, ks_sh, ks_sl, b, h, s)] (v likewise; a zero stride
  // shares a scale).
  bool kv_quantized;
  KvFormat kv_format;
  const float* k_scale;
  const float* v_scale;
  int64_t ks_sb, ks_sh, ks_sl, vs_sb, vs_sh, vs_sl;
  // KIVI int4 / int2 (kivi_bits > 0, with kv_quantized): k and v hold packed codes,
  // rows of D * kivi_bits / 8 bytes laid out [slots, Hkv, bytes], so a row's offset / bytes is slot * Hkv + h.
  // Float16 scales and zeros as fastar.quantize_kivi_append writes them: keys [slots / kivi_group, Hkv, D],
  // values [slots, Hkv, D / kivi_group]. Sequence b's first kivi_split[2b] keys and kivi_split[2b + 1] values
  // are quantized; the later ones are in the windows [B, kivi_window_len, Hkv, D] (q's dtype) at position
  // % kivi_window_len.
  int kivi_bits;
  int64_t kivi_group, kivi_window_len;
  const uint16_t* kivi_k_scale;
  const uint16_t* kivi_k_zero;
  const uint16_t* kivi_v_scale;
  const uint16_t* kivi_v_zero;
  const void* kivi_k_window;
  const void* kivi_v_window;
  const int32_t* kivi_split;
};

constexpr float kQkNormEps = 1e-12f;  // F.normalize's eps: x / max(|x|, eps)

// qk_norm's factor for a row with this sum of squares: 1 / max(|x|, eps); NaN for a row holding NaN.
FASTAR_HD float qk_norm_factor(float sum_squares) { return 1.0f / softmax_max(sqrtf(sum_squares), kQkNormEps); }

FASTAR_HD int64_t kv_len(const AttentionParams& p, int64_t b) { return p.kv_lens ? p.kv_lens[b] : p.Lk; }

// Per-sequence positions of the mask: query i's causal diagonal is key i + diag; the bit-packed part
// starts at key bits_start.
struct MaskGeometry {
  int64_t diag;
  int64_t bits_start;
};

FASTAR_HD MaskGeometry mask_geometry(const AttentionParams& p, int64_t b) {
  const int64_t lk = kv_len(p, b);
  return MaskGeometry{p.mask.bottom_right ? lk - p.Lq : 0, lk - p.mask.bits_cols};
}

// Key position s (>= 0) -> its block_table column and row in the page: a 32-bit division when both fit (a GPU's
// 64-bit division is a subroutine call).
struct PagePos {
  int64_t column, row;
};
FASTAR_HD PagePos page_pos(const AttentionParams& p, int64_t s) {
  if (static_cast<uint64_t>(s) <= 0xffffffffu && static_cast<uint64_t>(p.page_size) <= 0xffffffffu) {
    const uint32_t s32 = static_cast<uint32_t>(s), ps = static_cast<uint32_t>(p.page_size);
    return PagePos{s32 / ps, s32 % ps};
  }
  return PagePos{s / p.page_size, s % p.page_size};
}

// Key position -> element offset of its row in k or v (for head h of batch b).
FASTAR_HD int64_t kv_row_offset(const AttentionParams& p, int64_t sb, int64_t sh, int64_t sl, int64_t b, int64_t h,
                                int64_t s) {
  if (p.block_table) {
    const PagePos pp = page_pos(p, s);
    return p.block_table[b * p.bt_sb + pp.column] * sb + h * sh + pp.row * sl;
  }
  return b * sb + h * sh + s * sl;
}

FASTAR_HD bool block_visible(BlockRelation r, int32_t qb, int32_t kb) {
  switch (r) {
    case BlockRelation::kCausal:
      return kb <= qb;
    case BlockRelation::kSame:
      return kb == qb;
    case BlockRelation::kPrev:
      return kb <= qb && int64_t{kb} >= int64_t{qb} - 1;
    default:
      return true;
  }
}

// The next-scale local window rule, in pieces so a kernel can cache a key's mapped cell per query scale.
struct GridCell {
  int64_t y, x;
};

// Keys of the query's own scale and of the first full_scales scales are not restricted by the window.
FASTAR_HD bool scale_window_exempt(const AttentionMask& m, int32_t sq, int32_t sk) {
  return sk == sq || sk < m.full_scales;
}

// Key token tk of scale sk mapped onto the grid of scale sq: the cell holding its centre.
FASTAR_HD GridCell scale_window_cell(const AttentionMask& m, int64_t tk, int32_t sq, int32_t sk) {
  // Ids outside [0, num_scales) are rejected on the CPU only; clamping keeps every read in bounds.
  const int64_t last = m.num_scales - 1;
  const int64_t a = sq < 0 ? 0 : (sq > last ? last : sq), c = sk < 0 ? 0 : (sk > last ? last : sk);
  return GridCell{(2 * int64_t{m.tok_y[tk]} + 1) * m.scale_hw[2 * a] / (2 * m.scale_hw[2 * c]),
                  (2 * int64_t{m.tok_x[tk]} + 1) * m.scale_hw[2 * a + 1] / (2 * m.scale_hw[2 * c + 1])};
}

// Whether a mapped cell lies within scale_window cells of query token tq (Chebyshev distance).
FASTAR_HD bool scale_window_near(const AttentionMask& m, GridCell cell, int64_t tq) {
  const int64_t dy = cell.y - m.tok_y[tq], dx = cell.x - m.tok_x[tq], r = m.scale_window;
  return dy <= r && -dy <= r && dx <= r && -dx <= r;
}

FASTAR_HD bool scale_window_visible(const AttentionMask& m, int64_t tq, int64_t tk, int32_t sq, int32_t sk) {
  return scale_window_exempt(m, sq, sk) || scale_window_near(m, scale_window_cell(m, tk, sq, sk), tq);
}

// Whether query i of batch b sees key j (bias excluded: it is added to the logit, not tested).
FASTAR_HD bool mask_visible(const AttentionMask& m, int64_t b, int64_t i, int64_t j, MaskGeometry g) {
  const int64_t d = i + g.diag;
  if (m.causal && j > d) return false;
  if (m.window && !(d - j <= m.window_left && j <= d) && j >= m.window_sinks) return false;
  if (m.block != BlockRelation::kNone &&
      !block_visible(m.block, m.q_block_ids[b * m.q_block_sb + i], m.k_block_ids[b * m.k_block_sb + j]))
    return false;
  if (m.bits && j >= g.bits_start) {
    const int64_t c = j - g.bits_start;
    if (!((m.bits[b * m.bits_sb + i * m.bits_row + (c >> 3)] >> (c & 7)) & 1)) return false;
  }
  if (m.scale_window >= 0 && !scale_window_visible(m, i + m.q_token_offset, j, m.q_block_ids[b * m.q_block_sb + i],
                                                   m.k_block_ids[b * m.k_block_sb + j]))
    return false;
  return true;
}

enum class TileClass : int32_t { kHidden = 0, kPartial = 1, kFull = 2 };

// Classifies the tile of queries [i0, i1) x keys [j0, j1) (both non-empty). Block ids are summarised by
// their ranges over the tile, so the answer is exact for sorted ids and conservative (partial) otherwise.
FASTAR_HD TileClass classify_tile(const AttentionMask& m, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                  MaskGeometry g) {
  bool full = true;
  // Whether a next-scale window leaves every pair of the tile alone (scale_window_exempt for all its ids).
  bool window_exempt = false;
  const int64_t d_lo = i0 + g.diag, d_hi = i1 - 1 + g.diag;  // the tile's first and last query diagonals
  if (m.causal) {
    if (j0 > d_hi) return TileClass::kHidden;
    full &= j1 - 1 <= d_lo;
  }
  if (m.window) {
    const bool in_sinks = j1 <= m.window_sinks;
    // Distances first: d - window_left overflows for a window_left near 2^63.
    if (!in_sinks && j0 >= m.window_sinks && (d_lo - (j1 - 1) > m.window_left || j0 > d_hi)) return TileClass::kHidden;
    full &= in_sinks || (d_hi - j0 <= m.window_left && j1 - 1 <= d_lo);
  }
  if (m.block != BlockRelation::kNone) {
    int32_t qmin = m.q_block_ids[b * m.q_block_sb + i0], qmax = qmin;
    for (int64_t i = i0 + 1; i < i1; ++i) {
      const int32_t v = m.q_block_ids[b * m.q_block_sb + i];
      qmin = v < qmin ? v : qmin;
      qmax = v > qmax ? v : qmax;
    }
    int32_t kmin = m.k_block_ids[b * m.k_block_sb + j0], kmax = kmin;
    for (int64_t j = j0 + 1; j < j1; ++j) {
      const int32_t v = m.k_block_ids[b * m.k_block_sb + j];
      kmin = v < kmin ? v : kmin;
      kmax = v > kmax ? v : kmax;
    }
    window_exempt = kmax < m.full_scales || (kmin == kmax && qmin == qmax && kmin == qmin);
    switch (m.block) {
      case BlockRelation::kCausal:
        if (kmin > qmax) return TileClass::kHidden;
        full &= kmax <= qmin;
        break;
      case BlockRelation::kSame:
        if (kmax < qmin || kmin > qmax) return TileClass::kHidden;
        full &= kmin == kmax && qmin == qmax && kmin == qmin;
        break;
      case BlockRelation::kPrev:
        if (kmax < int64_t{qmin} - 1 || kmin > qmax) return TileClass::kHidden;  // 64 bits: ids near -2^31
        full &= int64_t{kmin} >= int64_t{qmax} - 1 && kmax <= qmin;
        break;
      default:
        break;
    }
  }
  if (m.bits) full &= j1 <= g.bits_start;
  if (m.bias) full = false;
  if (m.tile_map) {
    bool any = false, all = true;
    for (int64_t qb = i0 / m.tile_q; qb <= (i1 - 1) / m.tile_q; ++qb) {
      for (int64_t kb = j0 / m.tile_k; kb <= (j1 - 1) / m.tile_k; ++kb) {
        const uint8_t c = m.tile_map[qb * m.tile_cols + kb];
        any |= c != static_cast<uint8_t>(TileClass::kHidden);
        all &= c == static_cast<uint8_t>(TileClass::kFull);
      }
    }
    if (!any) return TileClass::kHidden;
    // The map's blocks need not line up with the tile: a block it shares with another scale's queries is
    // partial there, although the window leaves this tile whole (a scale's own keys).
    full &= all || window_exempt;
  } else if (m.scale_window >= 0) {
    full &= window_exempt;
  }
  return full ? TileClass::kFull : TileClass::kPartial;
}

}  // namespace fastar
