// The draft tests of the chain acceptance kernels (fastar.speculative_sample, lantern_accept, gsd_accept and
// sjd_accept), shared by the CPU and CUDA kernels so that the same seed gives the same tokens on every backend.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/acceptance.h"

namespace fastar {

// Most ranking neighbours GSD takes on each side of a draft.
constexpr int kGsdMaxSide = 16;

// The chain op's arguments plus the rules': LANTERN's neighbour table [V, nb_k] (null: not LANTERN) and
// total-variation budget delta in 40-bit fixed point; GSD's embeddings [V, emb_d] float32 (null: not GSD),
// ranking neighbours per side and thresholds; SJD's refreshed drafts [B, n] and their target probabilities
// [B, n] (null: no refresh).
struct ChainAcceptParams : SpeculativeSampleParams {
  const void* neighbors;
  bool nb64;
  int64_t nb_k;
  uint64_t delta_fixed;
  const float* embeddings;
  int64_t emb_d;
  int32_t gsd_above, gsd_below;
  double gsd_prob_tol;
  float gsd_dist_tol;
  int32_t* next_drafts;
  float* next_probs;
};

// The ranking of a target row: a before b iff p(a) > p(b), ties by the smaller id (a stable descending sort).
FASTAR_HD bool ranks_before(float pa, int64_t a, float pb, int64_t b) { return pa > pb || (pa == pb && a < b); }

// The tokens ranked nearest to x on each side (docs/acceptance.md, GSD), nearest first: above[0] ranks just
// before x, below[0] just after it. Built in one pass by offer(); the result does not depend on the order of
// the offers, so a warp may offer strided tokens per lane and merge (cuda/speculative_sample.cuh).
struct RankWindow {
  float px;
  int64_t x;
  int32_t cap[2];  // [0] above, [1] below
  int32_t count[2];
  float p[2][kGsdMaxSide];
  int32_t t[2][kGsdMaxSide];

  FASTAR_HD RankWindow(float px_, int64_t x_, int32_t above, int32_t below) : px(px_), x(x_) {
    cap[0] = above;
    cap[1] = below;
    count[0] = count[1] = 0;
  }

  // Whether (pa, a) is nearer to x than (pb, b) on side s.
  FASTAR_HD static bool nearer(int s, float pa, int64_t a, float pb, int64_t b) {
    return s == 0 ? ranks_before(pb, b, pa, a) : ranks_before(pa, a, pb, b);
  }

  // False when pt can enter neither list (a full list's farthest entry, or x when a side takes none, is
  // strictly nearer): the scans skip offer() for almost every token of a row with this one test.
  FASTAR_HD bool may_take(float pt) const {
    const float hi = count[0] < cap[0] ? INFINITY : cap[0] > 0 ? p[0][cap[0] - 1] : px;
    const float lo = count[1] < cap[1] ? -INFINITY : cap[1] > 0 ? p[1][cap[1] - 1] : px;
    return !(pt > hi || pt < lo);
  }

  FASTAR_HD void offer(float pt, int64_t tok) {
    if (tok == x) return;
    const int s = ranks_before(pt, tok, px, x) ? 0 : 1;
    int32_t pos = count[s];
    if (pos == cap[s]) {
      if (pos == 0 || !nearer(s, pt, tok, p[s][pos - 1], t[s][pos - 1])) return;
      --pos;
    } else {
      ++count[s];
    }
    for (; pos > 0 && nearer(s, pt, tok, p[s][pos - 1], t[s][pos - 1]); --pos) {
      p[s][pos] = p[s][pos - 1];
      t[s][pos] = t[s][pos - 1];
    }
    p[s][pos] = pt;
    t[s][pos] = static_cast<int32_t>(tok);
  }
};

// ||e_a - e_b||^2 over embeddings [V, d] float32, summed in order of the dimension with fused multiply-adds
// (so every backend gets the same bits); 16-byte loads where the rows allow.
FASTAR_HD float embedding_sq_dist(const float* e, int64_t d, int64_t a, int64_t b) {
  struct alignas(16) F4 {
    float v[4];
  };
  const float* ea = e + a * d;
  const float* eb = e + b * d;
  float s = 0.0f;
  int64_t c = 0;
  if ((reinterpret_cast<uintptr_t>(ea) | reinterpret_cast<uintptr_t>(eb)) % 16 == 0) {
    for (; c + 4 <= d; c += 4) {
      const F4 va = *reinterpret_cast<const F4*>(ea + c), vb = *reinterpret_cast<const F4*>(eb + c);
      for (int l = 0; l < 4; ++l) s = fmaf(va.v[l] - vb.v[l], va.v[l] - vb.v[l], s);
    }
  }
  for (; c < d; ++c) s = fmaf(ea[c] - eb[c], ea[c] - eb[c], s);
  return s;
}

// GSD's test of draft x (docs/acceptance.md): the group G is x plus the window's tokens t with
// |p(t) - p(x)| < gsd_prob_tol (in double) and ||e_t - e_x||^2 < gsd_dist_tol; x is accepted iff
// u * q(G) < p(G), masses in fixed point (q one-hot at x when q is null). q is validated at every member.
template <typename P, typename Load>
FASTAR_HD int32_t gsd_group_test(const ChainAcceptParams& prm, const RankWindow& w, const P* q, Load load, double u,
                                 float qx, bool* accepted) {
  using namespace accept;
  uint64_t p_mass = fixed_weight(w.px), q_mass = fixed_weight(qx);
  int32_t status = kOk;
  for (int s = 0; s < 2; ++s) {
    for (int32_t c = 0; c < w.count[s]; ++c) {
      const float pt = w.p[s][c];
      const int64_t tok = w.t[s][c];
      if (!(fabs(static_cast<double>(pt) - static_cast<double>(w.px)) < prm.gsd_prob_tol)) continue;
      if (!(embedding_sq_dist(prm.embeddings, prm.emb_d, w.x, tok) < prm.gsd_dist_tol)) continue;
      const float qt = q ? load(q[tok]) : 0.0f;
      if (!prob_ok(qt)) status |= kBadValue;
      p_mass += fixed_weight(pt);
      q_mass += fixed_weight(qt);
    }
  }
  *accepted = u * static_cast<double>(q_mass) < static_cast<double>(p_mass);
  return status;
}

// What every draft test reads first: draft i's id x (validated), p(x), q(x) (1 when q is null) and its uniform.
template <typename P, typename Load>
FASTAR_HD int32_t draft_head(const ChainAcceptParams& prm, int64_t b, int64_t i, const P* tp, const P* dp, Load load,
                             int64_t* x, float* px, float* qx, double* u) {
  using namespace accept;
  *x = load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i);
  if (*x < 0 || *x >= prm.V) return kBadTokenId;
  *px = load(tp[i * prm.tp_sn + *x]);
  *qx = dp ? load(dp[i * prm.dp_sn + *x]) : 1.0f;
  if (!prob_ok(*px) || !prob_ok(*qx)) return kBadValue;
  *u = draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(i)).accept_u;
  return kOk;
}

// SJD's refresh (docs/acceptance.md): after a rejection at j < k, positions j+1..k get tokens drawn from their
// own target rows (fixed-point inverse CDF with draw(b, pos).sample_bits), written to slot pos - j - 1 of the
// row's next_drafts. The number of refreshed positions:
FASTAR_HD int64_t sjd_refresh_count(const ChainAcceptParams& prm, int64_t j, int64_t k) {
  return prm.next_drafts && j < k ? k - j : 0;
}

// Tests draft i of row b (tp, dp: the row's target and draft probabilities, dp null for a one-hot q;
// load(P) -> float) and returns its status; on kOk, *accepted is the outcome. The exact test is accept_draft;
// with kGsd and prm.embeddings, GSD's scans the whole target row for the ranking window (every value validated),
// then gsd_group_test (the CUDA kernels test GSD a warp per draft instead, and leave it out: its window would cost
// every thread-per-draft kernel a stack frame).
// LANTERN's (docs/acceptance.md): the proximity set A of x is x plus the longest prefix of x's neighbour row
// (entries equal to x skipped) whose target mass stays within the budget, so moving that mass onto x changes p
// by at most delta in total variation; x is accepted iff u * q(A) < p(A), masses in fixed point. Every entry
// of the row is validated, also past the prefix, so all backends agree on errors.
template <bool kGsd, typename P, typename Load>
FASTAR_HD int32_t test_draft(const ChainAcceptParams& prm, int64_t b, int64_t i, const P* tp, const P* dp, Load load,
                             bool* accepted) {
  using namespace accept;
  const int64_t V = prm.V;
  int64_t x;
  float px, qx;
  double u;
  const int32_t head = draft_head(prm, b, i, tp, dp, load, &x, &px, &qx, &u);
  if (head) return head;
  const P* p = tp + i * prm.tp_sn;
  const P* q = dp ? dp + i * prm.dp_sn : nullptr;
  if constexpr (kGsd) {
    if (prm.embeddings) {
      RankWindow w(px, x, prm.gsd_above, prm.gsd_below);
      bool ok = true;
      for (int64_t t = 0; t < V; ++t) {
        const float pt = load(p[t]);
        ok &= prob_ok(pt);
        if (w.may_take(pt)) w.offer(pt, t);
      }
      if (!ok) return kBadValue;
      return gsd_group_test(prm, w, q, load, u, qx, accepted);
    }
  }
  if (!prm.neighbors) {
    *accepted = accept_draft(u, px, qx);
    return kOk;
  }
  uint64_t moved = 0, q_mass = fixed_weight(qx);
  int32_t status = kOk;
  bool open = true;
  for (int64_t c = 0; c < prm.nb_k; ++c) {
    const int64_t y = load_index(prm.neighbors, prm.nb64, x * prm.nb_k + c);
    if (y < 0 || y >= V) {
      status |= kBadTokenId;
      continue;
    }
    if (y == x) continue;
    const float py = load(p[y]), qy = q ? load(q[y]) : 0.0f;
    if (!prob_ok(py) || !prob_ok(qy)) {
      status |= kBadValue;
      continue;
    }
    const uint64_t w = fixed_weight(py);
    open = open && moved + w <= prm.delta_fixed;
    if (open) {
      moved += w;
      q_mass += fixed_weight(qy);
    }
  }
  *accepted = u * static_cast<double>(q_mass) < static_cast<double>(fixed_weight(px) + moved);
  return status;
}

}  // namespace fastar
