// The draft test of the chain acceptance kernels (fastar.speculative_sample and fastar.lantern_accept),
// shared by the CPU and CUDA kernels so that the same seed gives the same tokens on every backend.
#pragma once
#include <cstdint>

#include "core/acceptance.h"

namespace fastar {

// The chain op's arguments plus LANTERN's: the codebook's neighbour table [V, nb_k] (null: the exact test)
// and the total-variation budget delta in 40-bit fixed point.
struct ChainAcceptParams : SpeculativeSampleParams {
  const void* neighbors;
  bool nb64;
  int64_t nb_k;
  uint64_t delta_fixed;
};

// Tests draft i of row b (tp, dp: the row's target and draft probabilities, dp null for a one-hot q;
// load(P) -> float) and returns its status; on kOk, *accepted is the outcome. The exact test is accept_draft.
// LANTERN's (docs/acceptance.md): the proximity set A of x is x plus the longest prefix of x's neighbour row
// (entries equal to x skipped) whose target mass stays within the budget, so moving that mass onto x changes p
// by at most delta in total variation; x is accepted iff u * q(A) < p(A), masses in fixed point. Every entry
// of the row is validated, also past the prefix, so all backends agree on errors.
template <typename P, typename Load>
FASTAR_HD int32_t test_draft(const ChainAcceptParams& prm, int64_t b, int64_t i, const P* tp, const P* dp, Load load,
                             bool* accepted) {
  using namespace accept;
  const int64_t V = prm.V;
  const int64_t x = load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i);
  if (x < 0 || x >= V) return kBadTokenId;
  const P* p = tp + i * prm.tp_sn;
  const P* q = dp ? dp + i * prm.dp_sn : nullptr;
  const float px = load(p[x]), qx = q ? load(q[x]) : 1.0f;
  if (!prob_ok(px) || !prob_ok(qx)) return kBadValue;
  const double u = draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(i)).accept_u;
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
