// CPU kernel of fastar.sample_cfg: (image, position) pairs in parallel. Per pair: one vectorised pass mixes the
// conditional and unconditional rows and finds the maximum, nth_element finds the top-k threshold, one vectorised
// pass computes the exp weights of the kept tokens, a weighted quickselect over them the top-p threshold, and a
// blocked fixed-point inverse CDF picks the token. No sort: V is 4096 (VAR) to 16384 (LlamaGen), k ~ 1000.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/sampling.h"
#include "cpu/fixed_point_row.h"
#include "cpu/vec.h"
#include "ops.h"
#include "ops/sample_cfg_args.h"

namespace fastar {
namespace {

using namespace sampling;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kPickBlock = 256;  // tokens per block of the inverse-CDF search

struct Candidate {
  float x;
  uint64_t w;
};

// Per-thread buffers, reused across the rows of a chunk.
struct Scratch {
  std::vector<float> x, e, tmp;
  std::vector<Candidate> kept;
  std::vector<uint64_t> block_sums;
};

// x[t] = guided logit of token t; returns the maximum, *nan = some x[t] is NaN.
template <typename P>
float mix_row(const P* cond, const P* uncond, int64_t V, float cond_w, float uncond_w, float* x, bool* nan) {
  float m = -kInf;
  bool bad = false;
  int64_t t = 0;
#if defined(FASTAR_CPU_AVX2)
  const __m256 cw = _mm256_set1_ps(cond_w), uw = _mm256_set1_ps(uncond_w);
  __m256 mv = _mm256_set1_ps(-kInf), nanv = _mm256_setzero_ps();
  for (; t + 8 <= V; t += 8) {
    const __m256 g = _mm256_fmadd_ps(cw, cpu::load8(cond + t), _mm256_mul_ps(uw, cpu::load8(uncond + t)));
    _mm256_storeu_ps(x + t, g);
    mv = _mm256_max_ps(mv, g);
    nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(g, g, _CMP_UNORD_Q));
  }
  m = cpu::hmax8(mv);
  bad = _mm256_movemask_ps(nanv) != 0;
#endif
  for (; t < V; ++t) {
    const float g = guided_logit(static_cast<float>(cond[t]), static_cast<float>(uncond[t]), cond_w, uncond_w);
    x[t] = g;
    bad |= std::isnan(g);
    m = g > m ? g : m;
  }
  *nan = bad;
  return m;
}

// e[t] = exp(x[t] - m) for x[t] >= floor, else 0; returns the fixed-point total of the kept weights.
uint64_t exp_weights(const float* x, int64_t V, float m, float floor, float* e) {
  uint64_t total = 0;
  int64_t t = 0;
#if defined(FASTAR_CPU_AVX2)
  const __m256 mv = _mm256_set1_ps(m), fv = _mm256_set1_ps(floor);
  __m256i acc = _mm256_setzero_si256();
  for (; t + 8 <= V; t += 8) {
    const __m256 g = _mm256_loadu_ps(x + t);
    const __m256 w = _mm256_and_ps(cpu::exp8(_mm256_sub_ps(g, mv)), _mm256_cmp_ps(g, fv, _CMP_GE_OQ));
    _mm256_storeu_ps(e + t, w);
    acc = cpu::add_fixed8(acc, w);
  }
  total = cpu::hsum(acc);
#endif
  for (; t < V; ++t) {
    e[t] = x[t] >= floor ? exp_nonpositive(x[t] - m) : 0.0f;
    total += accept::fixed_weight(e[t]);
  }
  return total;
}

// The largest value T among the candidates whose weights over {x >= T} sum to at least target
// (1 <= target <= their total): a quickselect that partitions by value and descends by mass. Reorders them.
float weighted_select(Candidate* first, Candidate* last, uint64_t target) {
  auto mass = [](const Candidate* a, const Candidate* b) {
    uint64_t s = 0;
    for (; a != b; ++a) s += a->w;
    return s;
  };
  for (;;) {
    const float a = first->x, b = first[(last - first) / 2].x, c = last[-1].x;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    Candidate* above = std::partition(first, last, [pivot](const Candidate& k) { return k.x > pivot; });
    Candidate* below = std::partition(above, last, [pivot](const Candidate& k) { return k.x == pivot; });
    const uint64_t hi = mass(first, above);
    if (hi >= target) {
      last = above;  // holds mass >= target >= 1, so it is not empty
      continue;
    }
    const uint64_t with_pivot = hi + mass(above, below);
    if (with_pivot >= target) return pivot;
    target -= with_pivot;
    first = below;
  }
}

// The token at which the inclusive prefix sum of the kept weights (x >= tau) first exceeds sample_target(bits,
// total): block sums first, then one block token by token.
int64_t pick_token(const float* x, const float* e, int64_t V, float tau, uint64_t bits, std::vector<uint64_t>& sums) {
  auto weight = [&](int64_t t) { return x[t] >= tau ? accept::fixed_weight(e[t]) : 0; };
  const int64_t blocks = (V + kPickBlock - 1) / kPickBlock;
  sums.assign(blocks, 0);
  uint64_t total = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t end = std::min(V, (blk + 1) * kPickBlock);
    int64_t t = blk * kPickBlock;
    uint64_t s = 0;
#if defined(FASTAR_CPU_AVX2)
    const __m256 tv = _mm256_set1_ps(tau);
    __m256i acc = _mm256_setzero_si256();
    for (; t + 8 <= end; t += 8) {
      const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(x + t), tv, _CMP_GE_OQ);
      acc = cpu::add_fixed8(acc, _mm256_and_ps(_mm256_loadu_ps(e + t), keep));
    }
    s = cpu::hsum(acc);
#endif
    for (; t < end; ++t) s += weight(t);
    sums[blk] = s;
    total += s;
  }
  uint64_t target = accept::sample_target(bits, total);
  int64_t blk = 0;
  while (target >= sums[blk]) target -= sums[blk++];
  uint64_t cum = 0;
  for (int64_t t = blk * kPickBlock;; ++t) {
    cum += weight(t);
    if (cum > target) return t;
  }
}

template <typename P>
int32_t sample_position(const SampleCfgParams& prm, int64_t b, int64_t l, Scratch& s, int64_t* token) {
  const int64_t V = prm.V;
  const P* cond = static_cast<const P*>(prm.logits) + b * prm.s_row + l * prm.s_pos;
  const P* uncond = cond + prm.B * prm.s_row;
  float* x = s.x.data();
  float* e = s.e.data();
  bool nan = false;
  const float m = mix_row(cond, uncond, V, prm.cond_w, prm.uncond_w, x, &nan);
  if (nan || m == kInf) return kBadValue;
  if (m == -kInf) return kNoFiniteLogit;

  float tau = -kInf;
  if (prm.top_k > 0) {  // the k-th largest logit; every token equal to it is kept
    std::copy(x, x + V, s.tmp.begin());
    std::nth_element(s.tmp.begin(), s.tmp.begin() + (prm.top_k - 1), s.tmp.end(), std::greater<float>());
    tau = s.tmp[prm.top_k - 1];
  }
  const uint64_t total = exp_weights(x, V, m, tau, e);
  if (prm.top_p_fixed) {  // tokens of weight 0 cannot be where the mass reaches the target: leave them out
    s.kept.clear();
    for (int64_t t = 0; t < V; ++t) {
      const uint64_t w = accept::fixed_weight(e[t]);
      if (w) s.kept.push_back({x[t], w});
    }
    tau = weighted_select(s.kept.data(), s.kept.data() + s.kept.size(), top_p_target(prm.top_p_fixed, total));
  }
  *token = pick_token(x, e, V, tau, accept::draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(l)).sample_bits,
                      s.block_sums);
  return kOk;
}

// Returns the status of every (b, l) (row-major), tokens written for the valid ones.
template <typename P>
std::vector<int32_t> sample_cfg_rows(const SampleCfgParams& prm) {
  std::vector<int32_t> status(prm.B * prm.L, kOk);
  at::parallel_for(0, prm.B * prm.L, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.x.resize(prm.V);
    s.e.resize(prm.V);
    if (prm.top_k > 0) s.tmp.resize(prm.V);
    for (int64_t i = begin; i < end; ++i) {
      status[i] = sample_position<P>(prm, i / prm.L, i % prm.L, s, prm.tokens + i);
      if (status[i] != kOk) prm.tokens[i] = -1;
    }
  });
  return status;
}

}  // namespace

at::Tensor sample_cfg_cpu(const at::Tensor& logits, double cfg, c10::string_view schedule,
                          std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                          double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset) {
  constexpr const char* op = "fastar.sample_cfg";
  SampleCfgLaunch l =
      prepare_sample_cfg(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset);
  TORCH_CHECK_VALUE(l.logits.is_cpu(), op, ": expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint64_t>(offset.item<int64_t>()),
                          nullptr, nullptr};
  std::vector<int32_t> status;
  dispatch_cpu_float(float_kind(l.logits), [&](auto tag) { status = sample_cfg_rows<decltype(tag)>(l.prm); });
  for (size_t i = 0; i < status.size(); ++i) {
    TORCH_CHECK_VALUE(status[i] == kOk, op, ": invalid logits at batch row ", i / l.prm.L, ", position ", i % l.prm.L,
                      ": ", describe_sample_status(status[i]));
  }
  return l.tokens;
}

}  // namespace fastar
