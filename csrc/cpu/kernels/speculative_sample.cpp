// The CPU kernel of the chain ops (fastar.speculative_sample, lantern_accept, gsd_accept, sjd_accept), compiled
// per ISA (cpu/vec.h): rows in parallel, each row reads only the values its draft tests need (p(x)/q(x), x's
// neighbours for LANTERN, the whole target row for GSD) and the probability rows it samples from
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
int32_t sample_one_row(const ChainAcceptParams& prm, int64_t b, int32_t* out, int64_t* accepted) {
  const int64_t n = prm.n, V = prm.V;
  int32_t* next = prm.next_drafts ? prm.next_drafts + b * n : nullptr;  // SJD's outputs, -1 / 0 padded
  float* next_p = prm.next_probs ? prm.next_probs + b * n : nullptr;
  auto clear_next = [&] {
    for (int64_t i = 0; next && i < n; ++i) {
      next[i] = -1;
      next_p[i] = 0.0f;
    }
  };
  clear_next();
  const int64_t k = row_num_draft(prm.num_draft, prm.nd64, b, n);
  if (k < 0) return kBadNumDraft;
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  auto draft = [&](int64_t i) { return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + i); };
  auto load = [](P v) { return static_cast<float>(v); };

  // Every draft is validated, also those after the first rejection, so all backends agree on errors.
  int32_t status = kOk;
  int64_t j = k;
  for (int64_t i = 0; i < k; ++i) {
    bool passed = false;
    status |= test_draft<true>(prm, b, i, tp, dp, load, &passed);
    if (!passed && j == k) j = i;
  }
  if (status) return status;
  for (int64_t i = 0; i < j; ++i) out[i] = static_cast<int32_t>(draft(i));

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

  // SJD: the positions after a rejection get fresh drafts from their target rows.
  const int64_t refresh = sjd_refresh_count(prm, j, k);
  for (int64_t m = 0; m < refresh; ++m) {
    const int64_t pos = j + 1 + m;
    const FixedRow<P> fresh{tp + pos * prm.tp_sn, nullptr, -1};
    const uint64_t mass = fresh.sum(0, V, &ok);
    const int32_t st = !ok ? kBadValue : mass == 0 ? kZeroMass : kOk;
    if (st) {
      clear_next();
      return st;
    }
    const int64_t t = fresh.find(V, sample_target(draw(prm.seed, b, pos).sample_bits, mass));
    next[m] = static_cast<int32_t>(t);
    next_p[m] = static_cast<float>(fresh.p[t]);
  }
  *accepted = j;
  return kOk;
}

template <typename P>
void speculative_sample_rows(const ChainAcceptParams& prm) {
  for_each_acceptance_row(prm.tokens, prm.num_accepted, prm.B, prm.n, [&](int64_t b, int32_t* out, int64_t* accepted) {
    return sample_one_row<P>(prm, b, out, accepted);
  });
}

}  // namespace

void speculative_sample(const ChainAcceptParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { speculative_sample_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
