// CPU kernel of fastar.speculative_sample: rows in parallel, each row reads only the p(x)/q(x) scalars of its
// drafts and the one or two probability rows it samples from (docs/acceptance.md).

#include "core/acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/fixed_point_row.h"
#include "ops.h"
#include "ops/acceptance_args.h"

namespace fastar {
namespace {

using namespace accept;

// Returns the row status; on success writes the emitted tokens and returns the accepted count in *accepted.
template <typename P>
int32_t sample_one_row(const SpeculativeSampleParams& prm, int64_t b, int32_t* out, int64_t* accepted) {
  const int64_t n = prm.n, V = prm.V;
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);
  if (k < 0) return kBadNumDraft;
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };
  auto p_of = [&](int64_t i, int64_t x) { return static_cast<float>(tp[i * prm.tp_sn + x]); };
  auto q_of = [&](int64_t i, int64_t x) { return dp ? static_cast<float>(dp[i * prm.dp_sn + x]) : 1.0f; };

  // Every draft is validated, also those after the first rejection, so all backends agree on errors.
  int32_t status = kOk;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = draft(i);
    if (x < 0 || x >= V) {
      status |= kBadTokenId;
    } else if (!prob_ok(p_of(i, x)) || !prob_ok(q_of(i, x))) {
      status |= kBadValue;
    }
  }
  if (status) return status;

  int64_t j = k;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = draft(i);
    if (!accept_draft(draw(prm.seed, b, i).accept_u, p_of(i, x), q_of(i, x))) {
      j = i;
      break;
    }
    out[i] = static_cast<int32_t>(x);
  }

  // Sample at j: from the residual norm(max(0, p - q)) after a rejection, else from the bonus row p_k.
  const bool rejected = j < k;
  cpu::FixedRow<P> row{tp + j * prm.tp_sn, rejected && dp ? dp + j * prm.dp_sn : nullptr,
                       rejected && !dp ? draft(j) : -1};
  bool ok = true;
  uint64_t total = row.sum(0, V, &ok);
  if (!ok) return kBadValue;
  if (total == 0 && rejected) {  // p == q up to fixed-point precision: the residual is empty, sample p
    row = cpu::FixedRow<P>{row.p, nullptr, -1};
    total = row.sum(0, V, &ok);
  }
  if (total == 0) return kZeroMass;
  out[j] = static_cast<int32_t>(row.find(V, sample_target(draw(prm.seed, b, j).sample_bits, total)));
  *accepted = j;
  return kOk;
}

template <typename P>
void speculative_sample_rows(const SpeculativeSampleParams& prm) {
  for_each_acceptance_row(prm.tokens, prm.num_accepted, prm.B, prm.n,
                          [&](int64_t b, int32_t* out, int64_t* accepted) { return sample_one_row<P>(prm, b, out, accepted); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> speculative_sample_cpu(const at::Tensor& draft_token_ids,
                                                          const std::optional<at::Tensor>& draft_probs,
                                                          const at::Tensor& target_probs,
                                                          const std::optional<at::Tensor>& num_draft_tokens,
                                                          const at::Tensor& seed, const at::Tensor& offset) {
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset);
  TORCH_CHECK_VALUE(l.target_probs.is_cpu(), "fastar.speculative_sample: expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint64_t>(offset.item<int64_t>()),
                          nullptr, nullptr};
  dispatch_cpu_float(float_kind(l.target_probs), [&](auto tag) { speculative_sample_rows<decltype(tag)>(l.prm); });
  raise_on_bad_rows("fastar.speculative_sample", l.prm.num_accepted, l.prm.B);
  return {l.tokens, l.num_accepted};
}

}  // namespace fastar
