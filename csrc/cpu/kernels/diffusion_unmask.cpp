// The CPU scoring kernel of fastar.diffusion_unmask, compiled per ISA (cpu/vec.h): the masked positions of the
// current block in parallel. Per position, vectorised passes over its V logits:
//  1. the maximum (and, for the margin, the second largest value) and NaN / +inf detection;
//  2. with Dream's filters, the smallest kept logit: the k-th largest (nth_element over the order keys) and the
//     nucleus's boundary (its mass, then a weighted select among the tokens heavy enough to hold it);
//  3. the fixed-point softmax sums (core/diffusion.h): the total and, for the entropy, its term;
//  4. the candidate: the first index of the maximum, or at a temperature the fixed-point inverse CDF of
//     softmax((x - max) / temperature) over the kept tokens (block sums first, then one block token by token).

#include "cpu/kernels/diffusion_unmask.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "core/diffusion.h"
#include "cpu/kernels/fixed_point_row.h"
#include "cpu/kernels/weighted_select.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

using namespace diffusion;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Weights by the vector exp only where fmadd is fused (as the scalar exp_nonpositive and CUDA's are): the generic
// ISA's unfused fmadd rounds differently, so it takes the scalar loops to keep every backend's bits.
constexpr bool kVectorExp = FASTAR_ISA_LEVEL > 0;

struct Top2 {
  float first = -kInf, second = -kInf;  // the two largest values, a tie counted twice
  void push(float v) {
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
  }
};

// The maximum and second largest logit; *nan = some logit is NaN.
template <typename P>
Top2 top2_row(const P* row, int64_t V, bool want_second, bool* nan) {
  Vec m1 = Vec::broadcast(-kInf), m2 = Vec::broadcast(-kInf);
  bool bad = false;
  int64_t t = 0;
  for (; t + kW <= V; t += kW) {
    const Vec g = Vec::load(row + t);
    if (want_second) m2 = max(m2, min(m1, g));
    m1 = max(m1, g);
    bad |= any_nan(g);
  }
  Top2 top;
  float lanes[kW];
  m1.store(lanes);
  for (int i = 0; i < kW; ++i) top.push(lanes[i]);
  if (want_second) {
    m2.store(lanes);
    for (int i = 0; i < kW; ++i) top.push(lanes[i]);
  }
  for (; t < V; ++t) {
    const float g = static_cast<float>(row[t]);
    bad |= std::isnan(g);
    top.push(g);
  }
  *nan = bad;
  return top;
}

// Per-thread buffers, kept across calls.
struct Scratch {
  std::vector<uint64_t> sums;
  std::vector<uint32_t> keys;
  std::vector<Candidate> cand;
};

// The fixed-point sum of exp((x - m) beta) over the logits x >= cut of tokens [t, end).
template <typename P>
uint64_t kept_mass(const P* row, int64_t t, int64_t end, float m, float beta, float cut) {
  const Vec mv = Vec::broadcast(m), bv = Vec::broadcast(beta);
  VecU64Sum acc = VecU64Sum::zero();
  for (; kVectorExp && t + kW <= end; t += kW) {
    const Vec g = Vec::load(row + t);
    acc = acc + fixed_weights(zero_below(exp((g - mv) * bv), g, cut));
  }
  uint64_t sum = hsum(acc);
  for (; t < end; ++t) {
    const float g = static_cast<float>(row[t]);
    sum += g >= cut ? sample_weight(g, m, beta) : 0;
  }
  return sum;
}

// The smallest logit Dream's filters keep (-inf: every one): the top_k-th largest, and the nucleus's boundary,
// selected among the tokens of weight >= (total - target + 1) / V: below that, the tokens at or under the boundary
// could not weigh the total minus the mass above it (less than the target).
template <typename P>
float filter_cut(const DiffusionUnmaskParams& prm, const P* row, float m, Scratch& s) {
  const int64_t V = prm.V;
  uint32_t tau = 0;
  if (prm.top_k > 0 && prm.top_k < V) {
    s.keys.resize(static_cast<size_t>(V));
    for (int64_t t = 0; t < V; ++t) s.keys[t] = sampling::order_key(static_cast<float>(row[t]));
    std::nth_element(s.keys.begin(), s.keys.begin() + (prm.top_k - 1), s.keys.end(), std::greater<uint32_t>());
    tau = s.keys[prm.top_k - 1];
  }
  if (prm.top_p_fixed) {
    const uint64_t total = kept_mass(row, 0, V, m, prm.filter_beta, -kInf);
    const uint64_t target = nucleus_target(prm.top_p_fixed, total);
    const uint64_t least = std::max<uint64_t>(1, (total - target + 1) / static_cast<uint64_t>(V));
    s.cand.clear();
    auto consider = [&](int64_t t) {
      const float g = static_cast<float>(row[t]);
      const uint64_t w = sample_weight(g, m, prm.filter_beta);
      if (w >= least) s.cand.push_back({sampling::order_key(g), w});
    };
    // A vector of exps all below (least - 1/2) 2^-40 holds no candidate (fixed_weight rounds to nearest).
    const float below = static_cast<float>((static_cast<double>(least) - 0.5) * 0x1p-40) * (1.0f - 0x1p-20f);
    const Vec mv = Vec::broadcast(m), bv = Vec::broadcast(prm.filter_beta);
    int64_t t = 0;
    for (; kVectorExp && t + kW <= V; t += kW) {
      if (hmax(exp((Vec::load(row + t) - mv) * bv)) < below) continue;
      for (int i = 0; i < kW; ++i) consider(t + i);
    }
    for (; t < V; ++t) consider(t);
    tau = std::max(tau, weighted_select(s.cand.data(), s.cand.data() + s.cand.size(), target));
  }
  return tau ? sampling::key_float(tau) : -kInf;
}

// The fixed-point total of exp((x - m) beta) and, with entropy, of entropy_term, over the logits x >= cut.
template <typename P>
void softmax_sums(const P* row, int64_t V, float m, float beta, float cut, bool entropy, PositionSums& s) {
  const Vec mv = Vec::broadcast(m), bv = Vec::broadcast(beta), cap = Vec::broadcast(128.0f);
  VecU64Sum tot = VecU64Sum::zero(), ent = VecU64Sum::zero();
  int64_t t = 0;
  for (; kVectorExp && t + kW <= V; t += kW) {
    const Vec g = Vec::load(row + t);
    const Vec d = (mv - g) * bv;
    const Vec e = zero_below(exp((g - mv) * bv), g, cut);
    tot = tot + fixed_weights(e);
    if (entropy) ent = ent + fixed_weights(e * min(d, cap));
  }
  s.total = hsum(tot);
  s.entropy = entropy ? hsum(ent) : 0;
  for (; t < V; ++t) {
    const float g = static_cast<float>(row[t]);
    if (!(g >= cut)) continue;
    const float e = sampling::exp_nonpositive((g - m) * beta);
    s.total += accept::fixed_weight(e);
    if (entropy) s.entropy += accept::fixed_weight(entropy_term(e, g, m, beta));
  }
}

template <typename P>
int64_t first_max(const P* row, int64_t V, float m) {
  int64_t t = 0;
  for (; t + kW <= V; t += kW) {
    const int hit = first_equal(Vec::load(row + t), m);
    if (hit >= 0) return t + hit;
  }
  for (; t < V; ++t) {
    if (static_cast<float>(row[t]) == m) return t;
  }
  return 0;  // unreachable: m is one of the values
}

// The token at which the inclusive prefix sum of sample_weight over the logits >= cut first exceeds
// sample_target(bits, total).
template <typename P>
int64_t sample_row(const P* row, int64_t V, float m, float inv_t, float cut, uint64_t bits,
                   std::vector<uint64_t>& sums) {
  auto weight = [&](int64_t t) {
    const float g = static_cast<float>(row[t]);
    return g >= cut ? sample_weight(g, m, inv_t) : 0;
  };
  auto block_sum = [&](int64_t t, int64_t end) { return kept_mass(row, t, end, m, inv_t, cut); };
  return sample_by_blocks(V, bits, sums, block_sum, weight);
}

template <typename P>
int32_t score_position(const DiffusionUnmaskParams& prm, int64_t b, int64_t j, Scratch& scratch) {
  const int64_t i = b * prm.block_len + j, p = prm.block_start + j, V = prm.V;
  prm.candidates[i] = -1;
  prm.confidence[i] = -kInf;
  if (prm.x[b * prm.L + p] != prm.mask_id) return kOk;
  const P* row = static_cast<const P*>(prm.logits) + b * prm.s_row + p * prm.s_pos;
  bool nan = false;
  const int32_t kind = prm.confidence_kind;
  const Top2 top = top2_row(row, V, kind == kMargin, &nan);
  const float m = top.first;
  if (nan || m == kInf) return kBadValue;
  if (m == -kInf) return kNoFiniteLogit;
  const float cut = prm.top_k || prm.top_p_fixed ? filter_cut(prm, row, m, scratch) : -kInf;
  const float conf_cut = prm.conf_filtered ? cut : -kInf, beta = prm.conf_beta;
  PositionSums s{};
  if (kind != kRandom) softmax_sums(row, V, m, beta, conf_cut, kind == kNegEntropy, s);
  if (kind == kMargin) s.second = top.second >= conf_cut ? sample_weight(top.second, m, beta) : 0;
  const accept::Draw d = accept::draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(p));
  const int64_t token = prm.inv_temperature > 0
                            ? sample_row(row, V, m, prm.inv_temperature, cut, d.sample_bits, scratch.sums)
                            : first_max(row, V, m);
  prm.candidates[i] = token;
  prm.confidence[i] = confidence_of(kind, s, static_cast<float>(row[token]), m, beta, d.accept_u, prm.confidence_noise);
  return kOk;
}

template <typename P>
void scores(const DiffusionUnmaskParams& prm) {
  at::parallel_for(0, prm.B * prm.block_len, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      prm.status[i] = score_position<P>(prm, i / prm.block_len, i % prm.block_len, scratch);
    }
  });
}

}  // namespace

void diffusion_scores(const DiffusionUnmaskParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { scores<decltype(t)>(prm); });
}

FASTAR_ISA_END
