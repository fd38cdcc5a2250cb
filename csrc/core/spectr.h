// Math of fastar.spectr_accept (SpecTr's K-SEQ over k i.i.d. drafts, docs/acceptance.md "SpecTr"), shared by the
// CPU and CUDA kernels so that the same seed gives the same tokens on every backend.
//
// rho* (the smallest rho >= 1 with 1 - (1 - beta(rho))^k <= rho beta(rho), beta(rho) = sum_x min(q, p / rho)) lies
// in [1, k] (k beta >= 1 - (1 - beta)^k). Writing beta(rho) = Q(r >= rho) + P(r < rho) / rho with r = p / q, one pass
// over V that adds each token's fixed-point p and q into kBins bins of r over a bracket gives beta exactly at every
// bin edge; the first edge that satisfies the condition brackets rho*, and the next pass splits that bin. After
// kPasses passes rho is the upper edge, at most (k - 1) / kBins^kPasses above rho* (any rho >= rho* is exact K-SEQ,
// only a little less likely to accept). Every sum is an integer, so every backend finds the same rho.
#pragma once
#include <math.h>

#include <cstdint>

#include "core/acceptance.h"
#include "core/macros.h"

namespace fastar {

// Arguments of one launch (csrc/ops/spectr_args.h); strides in elements, the V-stride is 1.
struct SpectrParams {
  const void* draft_ids;  // [B, k, n]
  bool ids64;
  int64_t ids_sb, ids_sk;
  const void* draft_probs;  // [B, k, n, V]: row t of draft j is q after draft j's first t tokens
  int64_t dp_sb, dp_sk, dp_sn;
  const void* target_probs;  // [B, k, n+1, V]: row t of draft j is p after draft j's first t tokens
  int64_t tp_sb, tp_sk, tp_sn;
  int32_t* draft_index;   // [B]
  int32_t* tokens;        // [B, n+1]
  int32_t* num_accepted;  // [B]
  int64_t B, K, n, V;
  PhiloxSeed seed;
  void* nodes;  // CUDA: [B, k, n] spectr::Node in the launch's workspace (the CPU solves the levels as it walks)
};

}  // namespace fastar

namespace fastar::spectr {

constexpr int kMaxDrafts = 64;  // drafts alive at a level are a uint64 bit set
constexpr int kBins = 1024;
constexpr int kPasses = 2;
constexpr int kBelow = -1;     // r below the bracket: the token adds p / rho at every edge
constexpr int kAbove = kBins;  // r at or above the bracket's top: it adds q
constexpr int kNone = -2;      // p = 0 or q = 0: it adds nothing at any rho
constexpr double kFixedUnit = 1.0 / accept::kFixedScale;

// Bins [lo + g * width, lo + (g + 1) * width) for g in [0, kBins).
struct Bracket {
  double lo, width;
};

FASTAR_HD Bracket first_bracket(int64_t k) { return {1.0, static_cast<double>(k - 1) / kBins}; }

FASTAR_HD double edge(const Bracket& br, int g) { return fma(static_cast<double>(g), br.width, br.lo); }

// The bin of a token with (validated) probabilities p and q.
FASTAR_HD int ratio_bin(float p, float q, const Bracket& br) {
  if (!(p > 0.0f) || !(q > 0.0f)) return kNone;
  const double r = static_cast<double>(p) / static_cast<double>(q);
  if (r < br.lo) return kBelow;
  const double g = (r - br.lo) / br.width;
  return g >= kBins ? kAbove : static_cast<int>(g);
}

// 1 - (1 - beta)^k by repeated multiplication (no library pow: identical everywhere).
FASTAR_HD double accept_probability(double beta, int64_t k) {
  double s = 1.0;
  for (int64_t i = 0; i < k; ++i) s *= 1.0 - beta;
  return 1.0 - s;
}

// beta at rho from the fixed-point masses of the tokens with r < rho (p_lt) and r >= rho (q_ge), at most 1.
FASTAR_HD double beta_at(double rho, uint64_t p_lt, uint64_t q_ge) {
  const double beta = (static_cast<double>(q_ge) + static_cast<double>(p_lt) / rho) * kFixedUnit;
  return beta < 1.0 ? beta : 1.0;
}

// Whether rho satisfies 1 - (1 - beta(rho))^k <= rho beta(rho), i.e. rho >= rho*.
FASTAR_HD bool edge_ok(double rho, double beta, int64_t k) { return rho * beta >= accept_probability(beta, k); }

// What a level's draft tests and residual need: accept x iff u * rho * q(x) < p(x), i.e. with probability
// min(1, p / (rho q)); residual weight p - min(q, p / rho) * c with c = P(accept) / beta.
struct Level {
  double rho;
  float inv_rho, c;
};

FASTAR_HD Level make_level(double rho, double beta, int64_t k) {
  if (k == 1) return {1.0, 1.0f, 1.0f};  // rho* = 1, c = 1: exactly speculative sampling's test and residual
  const double c = beta > 0.0 ? accept_probability(beta, k) / beta : 0.0;
  return {rho, static_cast<float>(1.0 / rho), static_cast<float>(c)};
}

// A level solved ahead of the walk (CUDA): at level t of draft j's prefix, where j is the first draft with that
// prefix and k >= 2 drafts share it; status accept::kOk or the rows' bad-value status.
struct Node {
  Level level;
  int32_t status;
};

FASTAR_HD bool accept_candidate(double u, const Level& lv, float p, float q) {
  return u * lv.rho * static_cast<double>(q) < static_cast<double>(p);
}

// Fixed-point weight of a token in the residual [p - min(q, p / rho) c] / (1 - P(accept)) (renormalised when
// sampled); negative values (rounding at rho ~ rho*) count as 0. Explicit fmaf: no backend contracts otherwise.
FASTAR_HD uint64_t residual_weight(float p, float q, const Level& lv) {
  return accept::fixed_weight(fmaf(-fminf(q, p * lv.inv_rho), lv.c, p));
}

// Random numbers of a row: draft j's test at level t uses draw(t * k + j).accept_u, the token sampled at level t
// (residual, or the bonus at t = n) draw(t * k).sample_bits. With k = 1 these are speculative_sample's.
FASTAR_HD uint32_t draw_position(int64_t t, int64_t k, int64_t j) { return static_cast<uint32_t>(t * k + j); }

}  // namespace fastar::spectr
