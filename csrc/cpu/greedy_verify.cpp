// CPU kernel of fastar.greedy_verify: accept drafts while they equal the target argmax (vLLM's rule:
// the first mismatch slot holds the target argmax; a bonus token only when every draft matched).

#include <cmath>
#include <limits>

#include "core/acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/vec.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {
namespace {

using namespace accept;

// First index of the maximum (torch.argmax's tie rule); -1 when the row holds a NaN. Two passes over the
// row (max, then the first index holding it): vectorised, and the second pass reads from cache.
template <typename P>
int64_t argmax_row(const P* row, int64_t V) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t t = 0;
#if defined(FASTAR_CPU_AVX2)
  __m256 mv = _mm256_set1_ps(best), nanv = _mm256_setzero_ps();
  for (; t + 8 <= V; t += 8) {
    const __m256 x = cpu::load8(row + t);
    mv = _mm256_max_ps(mv, x);
    nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  best = cpu::hmax8(mv);
  nan = _mm256_movemask_ps(nanv) != 0;
#endif
  for (; t < V; ++t) {
    const float v = static_cast<float>(row[t]);
    nan |= std::isnan(v);
    best = v > best ? v : best;
  }
  if (nan) return -1;
  t = 0;
#if defined(FASTAR_CPU_AVX2)
  const __m256 bv = _mm256_set1_ps(best);
  for (; t + 8 <= V; t += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(cpu::load8(row + t), bv, _CMP_EQ_OQ));
    if (hit) return t + __builtin_ctz(hit);
  }
#endif
  for (; t < V; ++t) {
    if (static_cast<float>(row[t]) == best) return t;
  }
  return 0;  // every value is -inf: index 0, as torch.argmax
}

template <typename P>
int32_t verify_one_row(const GreedyVerifyParams& prm, int64_t b, int32_t* out, int64_t* accepted) {
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, prm.n);
  if (k < 0) return kBadNumDraft;
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = draft(i);
    if (x < 0 || x >= prm.V) return kBadTokenId;
  }
  const P* logits = static_cast<const P*>(prm.target_logits) + b * prm.tl_sb;
  for (int64_t i = 0; i <= k; ++i) {
    const int64_t best = argmax_row(logits + i * prm.tl_sn, prm.V);
    if (best < 0) return kBadValue;
    out[i] = static_cast<int32_t>(best);
    if (i == k || best != draft(i)) {
      *accepted = i;
      return kOk;
    }
  }
  return kOk;  // unreachable: the loop returns at i == k
}

template <typename P>
void greedy_verify_rows(const GreedyVerifyParams& prm) {
  for_each_acceptance_row(prm.tokens, prm.num_accepted, prm.B, prm.n,
                          [&](int64_t b, int32_t* out, int64_t* accepted) { return verify_one_row<P>(prm, b, out, accepted); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> greedy_verify_cpu(const at::Tensor& draft_token_ids, const at::Tensor& target_logits,
                                                     const std::optional<at::Tensor>& num_draft_tokens) {
  GreedyVerifyLaunch l = prepare_greedy_verify(draft_token_ids, target_logits, num_draft_tokens);
  TORCH_CHECK_VALUE(l.target_logits.is_cpu(), "fastar.greedy_verify: expected CPU tensors");
  dispatch_cpu_float(float_kind(l.target_logits), [&](auto tag) { greedy_verify_rows<decltype(tag)>(l.prm); });
  raise_on_bad_rows("fastar.greedy_verify", l.prm.num_accepted, l.prm.B);
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
