// The CPU kernel of fastar.greedy_verify, compiled per ISA (cpu/vec.h): accept drafts while they equal the
// target argmax (vLLM's rule: the first mismatch slot holds the target argmax; a bonus token only when every
// draft matched).
#include "cpu/kernels/acceptance.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/argmax_row.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

using namespace accept;

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
  for_each_acceptance_row(prm.tokens, prm.num_accepted, prm.B, prm.n, [&](int64_t b, int32_t* out, int64_t* accepted) {
    return verify_one_row<P>(prm, b, out, accepted);
  });
}

}  // namespace

void greedy_verify(const GreedyVerifyParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { greedy_verify_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
