// fastar.spectr_accept on the CPU (docs/acceptance.md "SpecTr"): rows in parallel, one scalar walk down the
// drafts' prefix tree per row with the rule of core/spectr.h; invalid rows raise.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "core/spectr.h"
#include "ops/spectr_args.h"

namespace fastar {
namespace {

using namespace accept;

template <typename P>
bool row_ok(const P* r, int64_t V) {
  bool ok = true;
  for (int64_t t = 0; t < V; ++t) ok &= prob_ok(static_cast<float>(r[t]));
  return ok;
}

// rho* of one level with k >= 2 drafts (core/spectr.h); p and q are validated. hp, hq: kBins each.
template <typename P>
spectr::Level solve_level(const P* p, const P* q, int64_t V, int64_t k, uint64_t* hp, uint64_t* hq) {
  using namespace spectr;
  Bracket br = first_bracket(k);
  double rho = 1.0, beta = 0.0;
  for (int pass = 0; pass < kPasses; ++pass) {
    std::fill(hp, hp + kBins, 0);
    std::fill(hq, hq + kBins, 0);
    uint64_t p_below = 0, q_above = 0;
    for (int64_t t = 0; t < V; ++t) {
      const float pt = static_cast<float>(p[t]), qt = static_cast<float>(q[t]);
      const int g = ratio_bin(pt, qt, br);
      if (g == kBelow) {
        p_below += fixed_weight(pt);
      } else if (g == kAbove) {
        q_above += fixed_weight(qt);
      } else if (g != kNone) {
        hp[g] += fixed_weight(pt);
        hq[g] += fixed_weight(qt);
      }
    }
    uint64_t q_bins = 0;
    for (int g = 0; g < kBins; ++g) q_bins += hq[g];
    uint64_t p_lt = p_below, q_lt = 0;
    int g = 0;
    for (;; ++g) {  // the first edge at or above rho*
      rho = edge(br, g);
      beta = beta_at(rho, p_lt, q_above + q_bins - q_lt);
      if (g == kBins || edge_ok(rho, beta, k)) break;
      p_lt += hp[g];
      q_lt += hq[g];
    }
    if (g == 0) break;
    br = Bracket{edge(br, g - 1), br.width / kBins};
  }
  return make_level(rho, beta, k);
}

// The first token whose inclusive prefix sum of weight(t) exceeds target (< the row's total).
template <typename Weight>
int64_t find_token(int64_t V, uint64_t target, Weight weight) {
  uint64_t cum = 0;
  for (int64_t t = 0; t < V; ++t) {
    cum += weight(t);
    if (cum > target) return t;
  }
  return V - 1;  // unreachable for target < total
}

// Returns the row status; on success writes the emitted tokens, *accepted and *index (the draft whose prefix
// was accepted: the lowest index among the drafts that agree with it).
template <typename P>
int32_t walk_row(const SpectrParams& prm, int64_t b, int32_t* out, int64_t* accepted, int32_t* index,
                 std::vector<uint64_t>& hist) {
  using namespace spectr;
  const int64_t K = prm.K, n = prm.n, V = prm.V;
  auto id = [&](int64_t j, int64_t t) {
    return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + j * prm.ids_sk + t);
  };
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t x = id(j, t);
      if (x < 0 || x >= V) return kBadTokenId;
    }
  }
  uint64_t alive = K == 64 ? ~uint64_t{0} : (uint64_t{1} << K) - 1;
  for (int64_t t = 0;; ++t) {
    const int64_t rep = __builtin_ctzll(alive);
    const P* p = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + rep * prm.tp_sk + t * prm.tp_sn;
    const uint64_t bits = draw(prm.seed, b, draw_position(t, K, 0)).sample_bits;
    *index = static_cast<int32_t>(rep);
    *accepted = t;
    if (t == n) {  // every level accepted: the bonus token from p
      if (!row_ok(p, V)) return kBadValue;
      uint64_t total = 0;
      for (int64_t x = 0; x < V; ++x) total += fixed_weight(static_cast<float>(p[x]));
      if (total == 0) return kZeroMass;
      out[t] = static_cast<int32_t>(
          find_token(V, sample_target(bits, total), [&](int64_t x) { return fixed_weight(static_cast<float>(p[x])); }));
      return kOk;
    }
    const P* q = static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + rep * prm.dp_sk + t * prm.dp_sn;
    const int64_t k = __builtin_popcountll(alive);
    Level lv = make_level(1.0, 0.0, 1);
    if (k > 1) {
      if (!row_ok(p, V) || !row_ok(q, V)) return kBadValue;
      lv = solve_level(p, q, V, k, hist.data(), hist.data() + kBins);
    }
    int64_t y = -1;
    for (uint64_t m = alive; m && y < 0; m &= m - 1) {  // the candidates in index order
      const int64_t j = __builtin_ctzll(m), x = id(j, t);
      const float px = static_cast<float>(p[x]), qx = static_cast<float>(q[x]);
      if (!prob_ok(px) || !prob_ok(qx)) return kBadValue;
      if (accept_candidate(draw(prm.seed, b, draw_position(t, K, j)).accept_u, lv, px, qx)) y = x;
    }
    if (y >= 0) {
      out[t] = static_cast<int32_t>(y);
      for (uint64_t m = alive; m; m &= m - 1) {
        const int64_t j = __builtin_ctzll(m);
        if (id(j, t) != y) alive &= ~(uint64_t{1} << j);
      }
      continue;
    }
    // No candidate accepted: the residual, or p where it has no mass (p == q up to fixed-point precision).
    if (k == 1 && (!row_ok(p, V) || !row_ok(q, V))) return kBadValue;
    auto residual = [&](int64_t x) { return residual_weight(static_cast<float>(p[x]), static_cast<float>(q[x]), lv); };
    auto target = [&](int64_t x) { return fixed_weight(static_cast<float>(p[x])); };
    uint64_t total = 0;
    for (int64_t x = 0; x < V; ++x) total += residual(x);
    if (total > 0) {
      out[t] = static_cast<int32_t>(find_token(V, sample_target(bits, total), residual));
      return kOk;
    }
    for (int64_t x = 0; x < V; ++x) total += target(x);
    if (total == 0) return kZeroMass;
    out[t] = static_cast<int32_t>(find_token(V, sample_target(bits, total), target));
    return kOk;
  }
}

template <typename P>
void spectr_rows(const SpectrParams& prm) {
  at::parallel_for(0, prm.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> hist(2 * spectr::kBins);
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* out = prm.tokens + b * (prm.n + 1);
      int64_t accepted = 0;
      int32_t index = -1;
      const int32_t status = walk_row<P>(prm, b, out, &accepted, &index, hist);
      for (int64_t i = status ? 0 : accepted + 1; i <= prm.n; ++i) out[i] = -1;
      prm.num_accepted[b] = status ? -status : static_cast<int32_t>(accepted);
      prm.draft_index[b] = status ? -1 : index;
    }
  });
}

}  // namespace

void run_spectr_accept_cpu(SpectrLaunch& l) {
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.spectr_accept: expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(l.seed.item<int64_t>()),
                          static_cast<uint64_t>(l.offset.item<int64_t>()), nullptr, nullptr};
  switch (float_kind(l.target_probs)) {
    case FloatKind::kFloat16:
      spectr_rows<c10::Half>(l.prm);
      break;
    case FloatKind::kBFloat16:
      spectr_rows<c10::BFloat16>(l.prm);
      break;
    default:
      spectr_rows<float>(l.prm);
  }
  raise_on_bad_rows("fastar.spectr_accept", l.prm.num_accepted, l.prm.B);
}

}  // namespace fastar
