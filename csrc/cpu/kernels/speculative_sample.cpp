// The CPU kernel of fastar.speculative_sample, compiled per ISA (cpu/vec.h): rows in parallel, each row reads
// only the p(x)/q(x) scalars of its drafts and the one or two probability rows it samples from
// (docs/acceptance.md).
#include "cpu/kernels/acceptance.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/fixed_point_row.h"

FASTAR_ISA_BEGIN
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
  FixedRow<P> row{tp + j * prm.tp_sn, rejected && dp ? dp + j * prm.dp_sn : nullptr, rejected && !dp ? draft(j) : -1};
  bool ok = true;
  uint64_t total = row.sum(0, V, &ok);
  if (!ok) return kBadValue;
  if (total == 0 && rejected) {  // p == q up to fixed-point precision: the residual is empty, sample p
    row = FixedRow<P>{row.p, nullptr, -1};
    total = row.sum(0, V, &ok);
  }
  if (total == 0) return kZeroMass;
  out[j] = static_cast<int32_t>(row.find(V, sample_target(draw(prm.seed, b, j).sample_bits, total)));
  *accepted = j;
  return kOk;
}

template <typename P>
void speculative_sample_rows(const SpeculativeSampleParams& prm) {
  for_each_acceptance_row(prm.tokens, prm.num_accepted, prm.B, prm.n, [&](int64_t b, int32_t* out, int64_t* accepted) {
    return sample_one_row<P>(prm, b, out, accepted);
  });
}

}  // namespace

void speculative_sample(const SpeculativeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { speculative_sample_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
