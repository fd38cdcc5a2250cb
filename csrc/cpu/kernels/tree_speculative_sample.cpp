// The CPU kernel of fastar.tree_speculative_sample, compiled per ISA (cpu/vec.h): rows in parallel, each
// walking its tree with core/tree_acceptance.h. A row reads the p(x), q(x) scalars of the children it tries
// and makes a vectorized pass over V per rejection (the residual's mass; one more to write the weights when a
// node rejects a second child) and up to two to draw the token.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

template <typename P>
struct CpuTreeOps {
  const TreeSampleParams& prm;
  uint64_t* w;  // the row's weights [V]
  int32_t* path;
  int32_t* tokens;

  static float load(const P* row, int64_t t) { return static_cast<float>(row[t]); }

  // The total of v's weights over [begin, end), stored to dst when kStore, by vectors of kW tokens; *ok: every
  // value read is a probability. The excluded token is handled after the loops.
  template <bool kStore>
  uint64_t pass(const TreeView<P>& v, int64_t begin, int64_t end, uint64_t* dst, bool* ok) const {
    TreeView<P> raw = v;
    raw.excluded = -1;
    const double mass = static_cast<double>(v.mass);
    VecU64Sum acc = VecU64Sum::zero();
    Vec::Mask bad{};
    int64_t t = begin;
    for (; t + kW <= end; t += kW) {
      VecU64 w;
      if (v.W) {
        w = VecU64::load(v.W + t);
        if (v.q) {
          const Vec q = Vec::load(v.q + t);
          bad = bad | not_prob(q);
          w = scaled_residual(w, q, mass);
        }
      } else {
        const Vec p = Vec::load(v.p + t);
        bad = bad | not_prob(p);
        if (v.q) {
          const Vec q = Vec::load(v.q + t);
          bad = bad | not_prob(q);
          w = fixed_weights(p - q);
        } else {
          w = fixed_weights(p);
        }
      }
      if (kStore) w.store(dst + t);
      acc = acc + w;
    }
    uint64_t total = hsum(acc);
    bool good = !any_lane(bad);
    for (; t < end; ++t) {
      good &= raw.values_ok(t, load);
      const uint64_t w = raw.weight(t, load);
      if (kStore) dst[t] = w;
      total += w;
    }
    if (v.excluded >= begin && v.excluded < end) {
      total -= raw.weight(v.excluded, load);
      if (kStore) dst[v.excluded] = 0;
    }
    *ok = good;
    return total;
  }

  uint64_t mass(const TreeView<P>& v, bool* ok) const { return pass<false>(v, 0, prm.V, nullptr, ok); }

  // Whole blocks skipped by their sums, then one walked token by token.
  int64_t find(const TreeView<P>& v, uint64_t target) const {
    constexpr int64_t kBlock = 256;
    uint64_t cum = 0;
    bool ok = true;
    for (int64_t begin = 0; begin < prm.V; begin += kBlock) {
      const int64_t end = begin + kBlock < prm.V ? begin + kBlock : prm.V;
      const uint64_t s = pass<false>(v, begin, end, nullptr, &ok);
      if (cum + s <= target) {
        cum += s;
        continue;
      }
      for (int64_t t = begin; t < end; ++t) {
        cum += v.weight(t, load);
        if (cum > target) return t;
      }
    }
    return prm.V - 1;  // unreachable for target < the total
  }

  const uint64_t* materialize(const TreeView<P>& v) const {
    bool ok = true;
    pass<true>(v, 0, prm.V, w, &ok);
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
