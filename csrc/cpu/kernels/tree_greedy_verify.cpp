// The CPU kernel of fastar.tree_greedy_verify, compiled per ISA (cpu/vec.h): rows in parallel, each walking its
// tree with core/tree_acceptance.h; one argmax pass over V for the root and for each matching node.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/kernels/argmax_row.h"

FASTAR_ISA_BEGIN
namespace {

template <typename P>
struct CpuGreedyOps : TreeRowOutputs {
  const P* logits;  // the row's [N + 1, V]
  int64_t* notes;   // [2N]

  int64_t argmax(int64_t i) const { return argmax_row(logits + i * prm.tp_sn, prm.V); }
  void note(int64_t i, int64_t value) const { notes[i] = value; }
  int64_t noted(int64_t i) const { return notes[i]; }
};

template <typename P>
void tree_verify_rows(const TreeSampleParams& prm) {
  for_each_tree_row<P>(
      prm, false, [&] { return std::vector<int64_t>(static_cast<size_t>(2 * prm.N)); },
      [&](int64_t b, const TreeRowOutputs& out, std::vector<int64_t>& notes, int64_t* accepted) {
        CpuGreedyOps<P> ops{out, static_cast<const P*>(prm.target_probs) + b * prm.tp_sb, notes.data()};
        return tree_greedy_walk(prm, b, ops, accepted);
      });
}

}  // namespace

void tree_greedy_verify(const TreeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { tree_verify_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
