// The CPU kernel of fastar.tree_speculative_sample, compiled per ISA (cpu/vec.h): rows in parallel, each
// walking its tree with core/tree_acceptance.h. A row reads the p(x), q(x) scalars of the children it tries
// and makes a pass over V per rejection (the residual's mass; one more to write the weights when a node
// rejects a second child) and two to draw the token.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/kernels/fixed_point_row.h"

FASTAR_ISA_BEGIN
namespace {

template <typename P>
struct CpuTreeOps {
  const TreeSampleParams& prm;
  uint64_t* w;  // the row's weights [V]
  int32_t* path;
  int32_t* tokens;

  static float load(const P* row, int64_t t) { return static_cast<float>(row[t]); }

  // Over the target row: FixedRow's vector loops. Over weights: one scalar pass.
  uint64_t mass(const TreeView<P>& v, bool* ok) const {
    if (!v.W) return FixedRow<P>{v.p, v.q, v.excluded}.sum(0, prm.V, ok);
    uint64_t sum = 0;
    bool good = true;
    for (int64_t t = 0; t < prm.V; ++t) {
      good &= v.values_ok(t, load);
      sum += v.weight(t, load);
    }
    *ok = good;
    return sum;
  }

  int64_t find(const TreeView<P>& v, uint64_t target) const {
    if (!v.W) return FixedRow<P>{v.p, v.q, v.excluded}.find(prm.V, target);
    uint64_t cum = 0;
    for (int64_t t = 0; t < prm.V; ++t) {
      cum += v.weight(t, load);
      if (cum > target) return t;
    }
    return prm.V - 1;  // unreachable for target < the total
  }

  const uint64_t* materialize(const TreeView<P>& v) const {
    for (int64_t t = 0; t < prm.V; ++t) w[t] = v.weight(t, load);
    return w;
  }

  void emit(int64_t i, int64_t node, int64_t token) const {
    tokens[i] = static_cast<int32_t>(token);
    if (node >= 0) path[i + prm.root_in_path] = static_cast<int32_t>(node + prm.root_in_path);
  }
};

template <typename P>
void tree_sample_rows(const TreeSampleParams& prm) {
  const int64_t W = prm.max_depth + 1;
  at::parallel_for(0, prm.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> w(static_cast<size_t>(prm.V));
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* path = prm.path + b * W;
      int32_t* tokens = prm.tokens + b * W;
      for (int64_t i = 0; i < W; ++i) path[i] = tokens[i] = -1;
      int32_t status = accept::kOk;
      for (int64_t t = 0; t < prm.N; ++t) status |= tree_node_status<P>(prm, b, t, CpuTreeOps<P>::load);
      int64_t accepted = 0;
      if (!status) {
        if (prm.root_in_path) path[0] = 0;
        CpuTreeOps<P> ops{prm, w.data(), path, tokens};
        status = tree_sample_walk<P>(prm, b, ops, &accepted);
      }
      if (status) {
        for (int64_t i = 0; i < W; ++i) path[i] = tokens[i] = -1;
      }
      prm.num_accepted[b] = status ? -status : static_cast<int32_t>(accepted);
    }
  });
}

}  // namespace

void tree_speculative_sample(const TreeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { tree_sample_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
