// The CPU kernel of fastar.sample_cfg, compiled per ISA (cpu/vec.h): (image, position) pairs in parallel. Per pair, no
// sort (V is 4096 for VAR, 16384 for LlamaGen, k ~ 1000):
//  1. one vectorised pass mixes the conditional and unconditional rows and finds the maximum;
//  2. one computes every token's fixed-point weight exp(x - max) and, to filter, its logit's order key and bin;
//  3. with top-k or top-p, one scalar pass counts tokens and sums weights per bin of max - x (1/32 wide, so
//     tokens spread over many bins). Walking the bins down from the maximum finds the bin holding the k-th
//     largest logit (and then the one where the top-p mass is reached); only that bin's few tokens are
//     selected exactly (nth_element by key, a weighted quickselect by mass);
//  4. a blocked fixed-point inverse CDF over the kept tokens picks the token.

#include "cpu/kernels/sample_cfg.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/sampling.h"
#include "cpu/kernels/fixed_point_row.h"
#include "cpu/kernels/weighted_select.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

using namespace sampling;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kBins = 2048;
constexpr float kBinsPerUnit = 32.0f;  // bins cover max - x in [0, 64); the last one also everything below

// Per-thread buffers, kept across calls: allocating them afresh cost a quarter of a VAR-d16 call.
struct Scratch {
  std::vector<float> x;
  std::vector<int32_t> bin;
  std::vector<uint32_t> key;
  std::vector<uint64_t> w, mass, block_sums;
  std::vector<uint32_t> count;
  std::vector<Candidate> cand;
};

// x[t] = guided logit of token t; returns the maximum, *nan = some x[t] is NaN.
template <typename P>
float mix_row(const P* cond, const P* uncond, int64_t V, float cond_w, float uncond_w, float* x, bool* nan) {
  float m = -kInf;
  bool bad = false;
  int64_t t = 0;
  const Vec cw = Vec::broadcast(cond_w), uw = Vec::broadcast(uncond_w);
  Vec mv = Vec::broadcast(-kInf);
  for (; t + kW <= V; t += kW) {
    const Vec g = fmadd(cw, Vec::load(cond + t), uw * Vec::load(uncond + t));
    g.store(x + t);
    mv = max(mv, g);
    bad |= any_nan(g);
  }
  m = hmax(mv);
  for (; t < V; ++t) {
    const float g = guided_logit(static_cast<float>(cond[t]), static_cast<float>(uncond[t]), cond_w, uncond_w);
    x[t] = g;
    bad |= std::isnan(g);
    m = g > m ? g : m;
  }
  *nan = bad;
  return m;
}

// Bin of a token: non-decreasing in max - x, so a lower bin holds only larger logits than a higher one (equal
// logits share a bin). Any monotone binning gives the same thresholds; this one spreads logits evenly.
int32_t bin_of(float x, float m) {
  const float d = (m - x) * kBinsPerUnit;
  return d < kBins - 1 ? static_cast<int32_t>(d) : kBins - 1;
}

// w[t] = token_weight(x[t], m) and, to filter, key[t] = order_key(x[t]), bin[t] = bin_of(x[t], m); returns the
// sum of the weights.
template <bool kFilter>
uint64_t weights_and_keys(const float* x, int64_t V, float m, uint64_t* w, uint32_t* key, int32_t* bin) {
  int64_t t = 0;
  const Vec mv = Vec::broadcast(m), per_unit = Vec::broadcast(kBinsPerUnit), last = Vec::broadcast(kBins - 1);
  VecU64Sum acc = VecU64Sum::zero();
  for (; t + kW <= V; t += kW) {
    const Vec g = Vec::load(x + t);
    const VecU64 f = fixed_weights(exp(g - mv));
    f.store(w + t);
    acc = acc + f;
    if constexpr (kFilter) {
      truncate(min((mv - g) * per_unit, last)).store(bin + t);  // inf -> last
      order_keys(g).store(key + t);
    }
  }
  uint64_t total = hsum(acc);
  for (; t < V; ++t) {
    w[t] = token_weight(x[t], m);
    if constexpr (kFilter) {
      key[t] = order_key(x[t]);
      bin[t] = bin_of(x[t], m);
    }
    total += w[t];
  }
  return total;
}

// The tokens of bin `bin` with key >= floor (and weight > 0 when positive_only), into cand. Few tokens match:
// kW bins are compared at once and only the matches looked at.
void collect(const Scratch& s, int64_t V, int32_t bin, uint32_t floor, bool positive_only,
             std::vector<Candidate>& cand) {
  cand.clear();
  auto consider = [&](int64_t t) {
    if (s.key[t] >= floor && (s.w[t] || !positive_only)) cand.push_back({s.key[t], s.w[t]});
  };
  int64_t t = 0;
  for (; t + kW <= V; t += kW) {
    for (unsigned hits = equal_lanes(VecI32::load(s.bin.data() + t), bin); hits; hits &= hits - 1) {
      consider(t + __builtin_ctz(hits));
    }
  }
  for (; t < V; ++t) {
    if (s.bin[t] == bin) consider(t);
  }
}

// The smallest kept key: top-k's k-th largest, then top-p's cut among the tokens top-k kept.
uint32_t threshold(const SampleCfgParams& prm, uint64_t total, Scratch& s) {
  const int64_t V = prm.V;
  std::fill(s.count.begin(), s.count.end(), 0u);
  std::fill(s.mass.begin(), s.mass.end(), 0ull);
  for (int64_t t = 0; t < V; ++t) {
    ++s.count[s.bin[t]];
    s.mass[s.bin[t]] += s.w[t];
  }
  uint32_t tau = 0;
  int tau_bin = -1;
  uint64_t tau_bin_mass = 0;  // the weights of tau_bin's tokens with key >= tau
  if (prm.top_k > 0) {
    int bin = 0;
    uint64_t count_above = 0, mass_above = 0;
    while (count_above + s.count[bin] < static_cast<uint64_t>(prm.top_k)) {
      count_above += s.count[bin];
      mass_above += s.mass[bin++];
    }
    collect(s, V, bin, 0, false, s.cand);
    const int64_t rank = prm.top_k - static_cast<int64_t>(count_above);  // 1-based, within the bin
    std::nth_element(s.cand.begin(), s.cand.begin() + (rank - 1), s.cand.end(),
                     [](const Candidate& a, const Candidate& b) { return a.key > b.key; });
    tau = s.cand[rank - 1].key;
    for (const Candidate& c : s.cand) tau_bin_mass += c.key >= tau ? c.w : 0;
    tau_bin = bin;
    total = mass_above + tau_bin_mass;
  }
  if (prm.top_p_fixed) {
    const uint64_t target = top_p_target(prm.top_p_fixed, total);  // <= total: the walk stops at tau_bin at the latest
    int bin = 0;
    uint64_t mass_above = 0;
    for (;; ++bin) {
      const uint64_t in_bin = bin == tau_bin ? tau_bin_mass : s.mass[bin];
      if (mass_above + in_bin >= target) break;
      mass_above += in_bin;
    }
    // Tokens of weight 0 cannot be where the mass reaches the target: leave them out.
    collect(s, V, bin, tau, true, s.cand);
    tau = weighted_select(s.cand.data(), s.cand.data() + s.cand.size(), target - mass_above);
  }
  return tau;
}

// The token at which the inclusive prefix sum of the kept weights (all, or key >= tau to filter) first exceeds
// sample_target(bits, total).
template <bool kFilter>
int64_t pick_token(const uint32_t* key, const uint64_t* w, int64_t V, uint32_t tau, uint64_t bits,
                   std::vector<uint64_t>& sums) {
  auto weight = [&](int64_t t) { return !kFilter || key[t] >= tau ? w[t] : 0; };
  auto block_sum = [&](int64_t t, int64_t end) {
    VecU64Sum acc = VecU64Sum::zero();
    for (; t + kW <= end; t += kW) {
      if constexpr (kFilter) {
        acc = acc + keep_at_least(VecU64::load(w + t), VecI32::load(key + t), tau);
      } else {
        acc = acc + VecU64::load(w + t);
      }
    }
    uint64_t sum = hsum(acc);
    for (; t < end; ++t) sum += weight(t);
    return sum;
  };
  return sample_by_blocks(V, bits, sums, block_sum, weight);
}

template <typename P>
int32_t sample_position(const SampleCfgParams& prm, int64_t b, int64_t l, Scratch& s, int64_t* token) {
  const int64_t V = prm.V;
  const P* cond = static_cast<const P*>(prm.logits) + b * prm.s_row + l * prm.s_pos;
  const P* uncond = cond + prm.B * prm.s_row;
  bool nan = false;
  const float m = mix_row(cond, uncond, V, prm.cond_w, prm.uncond_w, s.x.data(), &nan);
  if (nan || m == kInf) return kBadValue;
  if (m == -kInf) return kNoFiniteLogit;
  const uint64_t bits = accept::draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(l)).sample_bits;
  if (prm.top_k > 0 || prm.top_p_fixed) {
    const uint64_t total = weights_and_keys<true>(s.x.data(), V, m, s.w.data(), s.key.data(), s.bin.data());
    const uint32_t tau = threshold(prm, total, s);
    *token = pick_token<true>(s.key.data(), s.w.data(), V, tau, bits, s.block_sums);
  } else {
    weights_and_keys<false>(s.x.data(), V, m, s.w.data(), nullptr, nullptr);
    *token = pick_token<false>(nullptr, s.w.data(), V, 0, bits, s.block_sums);
  }
  return kOk;
}

// Returns the status of every (b, l) (row-major), tokens written for the valid ones.
template <typename P>
void sample_cfg_rows(const SampleCfgParams& prm, int32_t* status) {
  at::parallel_for(0, prm.B * prm.L, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch s;
    s.x.resize(prm.V);
    s.key.resize(prm.V);
    s.bin.resize(prm.V);
    s.w.resize(prm.V);
    s.count.resize(kBins);
    s.mass.resize(kBins);
    for (int64_t i = begin; i < end; ++i) {
      status[i] = sample_position<P>(prm, i / prm.L, i % prm.L, s, prm.tokens + i);
      if (status[i] != kOk) prm.tokens[i] = -1;
    }
  });
}

}  // namespace

void sample_cfg(const SampleCfgParams& prm, FloatKind kind, int32_t* status) {
  with_element_type(kind, [&](auto t) { sample_cfg_rows<decltype(t)>(prm, status); });
}

FASTAR_ISA_END
