// The CPU kernel of fastar.typical_accept, compiled per ISA (cpu/vec.h): rows in parallel, each walking its tree
// with core/tree_acceptance.h; the softmax statistics of the root's row and of each passing node's row, three
// vector passes each (max, its first index, the exponentials).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/kernels/argmax_row.h"

FASTAR_ISA_BEGIN
namespace {

template <typename P>
struct CpuTypicalOps : TreeRowOutputs {
  const P* logits;     // the row's [N + 1, V] (row stride tp_sn)
  TypicalNode* nodes;  // [N]

  static float load(const P* row, int64_t t) { return static_cast<float>(row[t]); }
  float logit(int64_t i, int64_t x) const { return load(logits + i * prm.tp_sn, x); }

  RowStats stats(int64_t i) const {
    const P* row = logits + i * prm.tp_sn;
    const int64_t V = prm.V;
    RowStats s{0.0f, argmax_row(row, V), 0.0f, 0.0f};
    if (s.argmax < 0 || prm.temperature == 0.0f) return s;
    s.max = load(row, s.argmax);
    const float inv_t = prm.inv_temperature;
    const Vec m = Vec::broadcast(s.max), scale = Vec::broadcast(inv_t), floor = Vec::broadcast(kTypicalFloor);
    Vec sum = Vec::zero(), weighted = Vec::zero();
    int64_t t = 0;
    for (; t + kW <= V; t += kW) {
      const Vec z = max((Vec::load(row + t) - m) * scale, floor), e = exp(z);
      sum = sum + e;
      weighted = fmadd(e, z, weighted);
    }
    s.sum = hsum(sum);
    s.weighted = hsum(weighted);
    for (; t < V; ++t) {
      const float z = std::max((load(row, t) - s.max) * inv_t, kTypicalFloor), e = std::exp(z);
      s.sum += e;
      s.weighted += e * z;
    }
    return s;
  }
  void keep(int64_t t, const TypicalNode& node) const { nodes[t] = node; }
  TypicalNode kept(int64_t t) const { return nodes[t]; }
};

template <typename P>
void typical_rows(const TreeSampleParams& prm) {
  for_each_tree_row<P>(
      prm, false, [&] { return std::vector<TypicalNode>(static_cast<size_t>(prm.N)); },
      [&](int64_t b, const TreeRowOutputs& out, std::vector<TypicalNode>& nodes, int64_t* accepted) {
        CpuTypicalOps<P> ops{out, static_cast<const P*>(prm.target_probs) + b * prm.tp_sb, nodes.data()};
        return typical_walk(prm, b, ops, accepted);
      });
}

}  // namespace

void typical_accept(const TreeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { typical_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
