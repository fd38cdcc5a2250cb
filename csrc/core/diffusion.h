// Math of fastar.diffusion_unmask (one parallel-unmasking step of a masked-diffusion LM) shared by the CPU and
// CUDA kernels, so that every backend commits the same tokens.
//
// Exactness across backends: the softmax sums are the fixed-point sums of core/sampling.h (40-bit weights of
// exp_nonpositive(x - max), summed as uint64), so every backend gets the same integers whatever its summation
// order. A confidence is one double expression of those integers (a division, and for the entropy a log by the
// polynomial below, with every fma written out), rounded once to float: bit-identical everywhere, so the
// selection (ranks, thresholds) is too. Temperature sampling is the fixed-point inverse CDF of
// softmax((x - max) / temperature) with one Philox draw per position: the distribution of LLaDA's Gumbel-max.
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>

#include "core/acceptance.h"
#include "core/macros.h"
#include "core/philox.h"
#include "core/sampling.h"

namespace fastar::diffusion {

// Status of one masked position (OR-ed over a row by the CUDA selection); the CPU op raises for it.
enum Status : int32_t {
  kOk = 0,
  kBadCount = 1,                              // num_transfer[b] < 0
  kBadValue = sampling::kBadValue,            // a NaN or +inf logit
  kNoFiniteLogit = sampling::kNoFiniteLogit,  // every logit is -inf
};

// What the confidence of a masked position is (the `confidence` argument of the op).
enum Confidence : int32_t {
  kProbability = 0,     // softmax(logits)[candidate]  (LLaDA low_confidence, Dream maskgit_plus)
  kMargin = 1,          // top-1 minus top-2 probability (Dream topk_margin)
  kNegEntropy = 2,      // sum p log p (Dream entropy)
  kRandom = 3,          // uniform in [0, 1) from the Philox draw of the position (LLaDA random)
  kLogProbability = 4,  // log softmax(logits)[candidate] (MaskGIT)
};

// Which masked positions of the current block are committed (the `rule` argument).
enum Rule : int32_t {
  kTopK = 0,       // the num_transfer[b] most confident (LLaDA)
  kThreshold = 1,  // the most confident, and every one with confidence >= threshold (Fast-dLLM)
  kFactor = 2,     // Fast-dLLM's factor rule (factor_count)
  kDInfer = 3,     // every one with confidence >= min(threshold, top - 1e-5) (dInfer)
  kDimple = 4,     // every one with confidence > threshold, or if none the num_transfer[b] first (Dimple)
  kSdar = 5,       // the num_transfer[b] first, or every one with confidence > threshold if more (SDAR's dynamic)
};

constexpr double kFixedOne = accept::kFixedScale;  // the weight of the maximum logit, 2^40

// log(y) for y >= 1 in double, from IEEE operations alone (no libm), so host and device agree bit for bit:
// y = 2^e f with f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(s), s = (f - 1) / (f + 1), |s| < 0.172, to s^15
// (relative error below 1e-12).
FASTAR_HD double log_at_least_one(double y) {
  const uint64_t bits = accept::double_bits(y);
  int64_t e = static_cast<int64_t>((bits >> 52) & 0x7ff) - 1023;
  uint64_t mant = (bits & 0xfffffffffffffull) | 0x3ff0000000000000ull;  // f in [1, 2)
  if (mant > 0x3ff6a09e667f3bcdull) {                                   // f > sqrt(2): halve it
    mant -= 0x0010000000000000ull;
    ++e;
  }
  double f;
#if defined(__CUDA_ARCH__)
  f = __longlong_as_double(static_cast<long long>(mant));
#else
  std::memcpy(&f, &mant, sizeof f);
#endif
  const double s = (f - 1.0) / (f + 1.0), s2 = s * s;
  double p = 2.0 / 15.0;
  p = fma(p, s2, 2.0 / 13.0);
  p = fma(p, s2, 2.0 / 11.0);
  p = fma(p, s2, 2.0 / 9.0);
  p = fma(p, s2, 2.0 / 7.0);
  p = fma(p, s2, 2.0 / 5.0);
  p = fma(p, s2, 2.0 / 3.0);
  p = fma(p, s2, 2.0);
  return fma(static_cast<double>(e), 0.69314718055994530942, s * p);
}

// The entropy term of one token at inverse temperature beta: e d with d = (max - x) beta and e = exp(-d) <= 1, so
// e d <= 1/e. The distance is clamped where e is 0 anyway (x = -inf would give 0 * inf).
FASTAR_HD float entropy_term(float e, float x, float max, float beta) {
  const float d = (max - x) * beta;
  return e * (d < 128.0f ? d : 128.0f);
}

// The sums one pass over a position's logits gives. total >= 2^40 (the maximum's own weight).
struct PositionSums {
  uint64_t total;    // sum of fixed(exp(x - max))
  uint64_t entropy;  // sum of fixed(entropy_term), kNegEntropy only
  uint64_t second;   // fixed(exp(second largest - max)): 2^40 when the maximum is tied, kMargin only
};

// -log(-log u), a standard Gumbel draw, from the position's uniform u in [0, 1) (0 taken as 2^-54), by IEEE
// operations and log_at_least_one alone.
FASTAR_HD double gumbel(double u) {
  const double nl = log_at_least_one(1.0 / (u > 0.0 ? u : 0x1p-54));  // -log u > 0
  return nl >= 1.0 ? -log_at_least_one(nl) : log_at_least_one(1.0 / nl);
}

// The sampling weight of a token at temperature 1 / inv_temperature.
FASTAR_HD uint64_t sample_weight(float x, float max, float inv_temperature) {
  return accept::fixed_weight(sampling::exp_nonpositive((x - max) * inv_temperature));
}

// The confidence of a position whose candidate has logit x_cand, the sums taken at inverse temperature beta; u is
// its uniform draw (kRandom, and the Gumbel noise scaled by `noise` added to the other kinds: MaskGIT's annealed
// noise, Dream's alg_temp).
FASTAR_HD float confidence_of(int32_t kind, const PositionSums& s, float x_cand, float max, float beta, double u,
                              double noise) {
  const double total = static_cast<double>(s.total);
  double c;
  switch (kind) {
    case kProbability:
      c = static_cast<double>(sample_weight(x_cand, max, beta)) / total;
      break;
    case kLogProbability:  // the candidate's weight is > 0: the argmax's is 2^40, a sampled one was drawn by it
      c = -log_at_least_one(total / static_cast<double>(sample_weight(x_cand, max, beta)));
      break;
    case kMargin:
      c = static_cast<double>(static_cast<uint64_t>(kFixedOne) - s.second) / total;
      break;
    case kNegEntropy:
      c = -(static_cast<double>(s.entropy) / total) - log_at_least_one(total / kFixedOne);
      break;
    default:
      return static_cast<float>(u);
  }
  return static_cast<float>(noise > 0.0 ? fma(noise, gumbel(u), c) : c);
}

// Dream's nucleus in fixed point: a token is kept while the mass of the tokens with a larger logit is <= top_p
// * total, i.e. kept tokens are those >= the largest logit T whose mass of logits >= T exceeds it, reaches
// floor(top_p * total) + 1 (top_p_fixed = ceil(top_p * 2^64) < 2^64, total < 2^63). Ties at T are all kept.
FASTAR_HD uint64_t nucleus_target(uint64_t top_p_fixed, uint64_t total) {
  return accept::mulhi64(top_p_fixed, total) + 1;
}

// Whether position a (confidence ca) is ahead of position b in the commit order: higher confidence first,
// equal confidences by the lower position.
FASTAR_HD bool ahead(float ca, int64_t a, float cb, int64_t b) { return ca > cb || (ca == cb && a < b); }

// Fast-dLLM's factor rule on the n confidences sorted in descending order: the first rank r >= 1 whose
// confidence is below 1 - factor / (r + 2) stops the count at r, except that a stop at the last rank (or no
// stop at all) commits all n, and n = 1 commits 1 (its loop's `top_i in (0, n - 1)` adjustment).
FASTAR_HD int64_t factor_count(const float* sorted, int64_t n, double factor) {
  int64_t r = 0;
  for (; r < n; ++r) {
    if (r > 0 && static_cast<double>(sorted[r]) < 1.0 - factor / static_cast<double>(r + 2)) break;
  }
  if (r == n) r = n - 1;
  if (r == 0 || r == n - 1) ++r;
  return r;
}

// How many of a row's n masked positions are committed: those of rank < this count, `sorted` holding their
// confidences in descending order (every rule commits a prefix of that order).
FASTAR_HD int64_t rank_quota(int32_t rule, int64_t n, int64_t requested, const float* sorted, double threshold,
                             double factor) {
  if (n == 0) return 0;
  if (rule == kFactor) return factor_count(sorted, n, factor);
  if (rule == kTopK) return requested < n ? requested : n;
  int64_t r = 0;
  if (rule == kDimple || rule == kSdar) {
    while (r<n&& static_cast<double>(sorted[r])> threshold) ++r;
    const int64_t k = requested < n ? requested : n;
    return rule == kDimple ? (r > 0 ? r : k) : (r > k ? r : k);
  }
  const double top = static_cast<double>(sorted[0]) - 1e-5;
  const double bar = rule == kDInfer && top < threshold ? top : threshold;
  while (r < n && static_cast<double>(sorted[r]) >= bar) ++r;
  return r > 0 ? r : 1;  // kThreshold: the most confident always
}

}  // namespace fastar::diffusion

namespace fastar {

// Arguments of one launch, filled by csrc/ops/diffusion_unmask_args.h. Logits are typed by the kernel (float,
// half or bfloat16), strides in elements, V-stride 1. Block position j is sequence position block_start + j.
struct DiffusionUnmaskParams {
  const void* logits;  // [B, L, V]
  int64_t s_row, s_pos;
  int64_t* x;                   // [B, L], contiguous: read for mask_id, committed tokens written
  const int64_t* num_transfer;  // [B] (kTopK), else null
  int64_t* candidates;          // [B, Lb]: the candidate token, -1 where not masked (or invalid)
  float* confidence;            // [B, Lb]: its confidence, -inf where not masked
  int64_t* remaining;           // [B]: block positions holding mask_id after the step (CUDA: -1, invalid row)
  int32_t* status;              // [B, Lb]: diffusion::Status of every block position
  float* sorted;                // [B, Lb]: scratch of the CUDA selection (descending confidences)
  int64_t B, L, V, block_start, block_len, mask_id;
  int32_t confidence_kind, rule;
  float inv_temperature;  // 0: the argmax (lowest index among equal maxima)
  // Filters of the candidate's distribution softmax(logits * filter_beta) (filter_beta: inv_temperature, or 1 at
  // the argmax), Dream's order: the nucleus (top_p_fixed = ceil(top_p * 2^64), 0: none) and the top_k largest
  // logits (0: none) are both taken over the whole row; a token is kept when it is in both (nucleus_target).
  float filter_beta;
  uint64_t top_p_fixed;
  int64_t top_k;
  // The confidence's distribution: softmax(logits * conf_beta), over the kept tokens alone when conf_filtered
  // (Dream's: the candidate's own distribution), else over all of them (LLaDA's: conf_beta = 1).
  float conf_beta;
  bool conf_filtered;
  double threshold, factor;
  double confidence_noise;  // scale of the Gumbel noise added to each confidence (0: none)
  PhiloxSeed seed;          // position (b, p) draws accept::draw(seed, b, p): sample_bits and accept_u (kRandom)
};

}  // namespace fastar
