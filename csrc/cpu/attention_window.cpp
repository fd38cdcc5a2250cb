// The parts of the CPU attention plan (cpu/attention_plan.h) for masks of block (scale) ids and the
// next-scale local window of a ScaleLayout: the patch order of a scale's queries and the key selection by
// runs of positions of one id.
#include <algorithm>
#include <tuple>

#include "cpu/attention_plan.h"

namespace fastar::cpu {

// Under a next-scale window, each scale's queries are taken in 4x4 patches of its grid (row-major patch
// order, then row-major inside the patch): a 32-query tile is then a 4x8 patch and a row group of 16 a
// 4x4 one, which see fewer coarse keys than two grid rows and one (docs/design/cpu-attention.md). The order
// only permutes positions of one scale id, so the ids read by index stay those of the tile.
void AttentionPlan::order_by_patches() {
  const AttentionMask& m = p_.mask;
  if (m.scale_window < 0 || m.block == BlockRelation::kNone || m.q_block_sb != 0) return;
  qpos_.resize(static_cast<size_t>(p_.Lq));
  for (int64_t i = 0; i < p_.Lq; ++i) qpos_[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  const int32_t* ty = m.tok_y + m.q_token_offset;
  const int32_t* tx = m.tok_x + m.q_token_offset;
  auto key = [&](int32_t i) { return std::make_tuple(ty[i] / 4, tx[i] / 4, ty[i] % 4, tx[i] % 4); };
  for (int64_t i = 0, run; i < p_.Lq; i += run) {
    for (run = 1; i + run < p_.Lq && m.q_block_ids[i + run] == m.q_block_ids[i];) ++run;
    std::stable_sort(qpos_.begin() + i, qpos_.begin() + i + run, [&](int32_t a, int32_t b) { return key(a) < key(b); });
  }
}

// visible_keys of masks of block (scale) ids alone, with or without the next-scale window. They go by runs
// of positions of one id: a key's block test and its cell on the query's grid are shared by the run. A cell
// outside the window around the run's bounding box is seen by none of it; the others get a vector loop over
// the run.
int64_t AttentionPlan::visible_keys_by_runs(const AttentionItem& it, int64_t j0, int64_t nk, uint8_t* vis,
                                            int32_t* idx) const {
  const AttentionMask& m = p_.mask;
  const int64_t nq = it.nq;
  struct Run {
    int64_t p0, p1;
    int32_t sq, y0, y1, x0, x1;
  };
  Run runs[kMaxRows];
  int64_t n_runs = 0;
  const int32_t* qids = m.q_block_ids + it.b * m.q_block_sb + it.i0;
  const int32_t* kids = m.k_block_ids + it.b * m.k_block_sb + j0;
  int32_t qy[kMaxRows], qx[kMaxRows];  // the queries' cells
  const int32_t* ty = m.scale_window >= 0 ? qy : nullptr;
  const int32_t* tx = m.scale_window >= 0 ? qx : nullptr;
  if (ty) {
    for (int64_t pos = 0; pos < nq; ++pos) {
      qy[pos] = m.tok_y[pos_at(it, pos) + m.q_token_offset];
      qx[pos] = m.tok_x[pos_at(it, pos) + m.q_token_offset];
    }
  }
  for (int64_t p0 = 0, p1; p0 < nq; p0 = p1) {
    Run& r = runs[n_runs++];
    r = Run{p0, p0, qids[p0], 0, 0, 0, 0};
    for (p1 = p0 + 1; p1 < nq && qids[p1] == r.sq; ++p1) {
    }
    r.p1 = p1;
    if (ty) {
      r.y0 = *std::min_element(ty + p0, ty + p1), r.y1 = *std::max_element(ty + p0, ty + p1);
      r.x0 = *std::min_element(tx + p0, tx + p1), r.x1 = *std::max_element(tx + p0, tx + p1);
    }
  }
  const int64_t w = m.scale_window;
  const uint32_t span = static_cast<uint32_t>(2 * w);
  int64_t n = 0;
  for (int64_t c = 0; c < nk; ++c) {
    uint8_t* v = vis + n * nq;
    const int32_t sk = kids[c];
    bool any = false;
    for (int64_t ri = 0; ri < n_runs; ++ri) {
      const Run& r = runs[ri];
      const bool keep = block_visible(m.block, r.sq, sk);
      if (!keep || w < 0 || scale_window_exempt(m, r.sq, sk)) {
        std::fill(v + r.p0, v + r.p1, keep);
        any |= keep;
        continue;
      }
      const GridCell cell = scale_window_cell(m, j0 + c, r.sq, sk);
      if (cell.y < r.y0 - w || cell.y > r.y1 + w || cell.x < r.x0 - w || cell.x > r.x1 + w) {
        std::fill(v + r.p0, v + r.p1, 0);
        continue;
      }
      any = true;  // perhaps: a row of zeros left over only computes -inf logits
      // scale_window_near with the cell's offset folded in: |d| <= w iff d + w, unsigned, <= 2w.
      const int32_t oy = static_cast<int32_t>(cell.y + w), ox = static_cast<int32_t>(cell.x + w);
      for (int64_t pos = r.p0; pos < r.p1; ++pos)
        v[pos] = (static_cast<uint32_t>(oy - ty[pos]) <= span) & (static_cast<uint32_t>(ox - tx[pos]) <= span);
    }
    if (any) idx[n++] = static_cast<int32_t>(c);
  }
  return n;
}

}  // namespace fastar::cpu
