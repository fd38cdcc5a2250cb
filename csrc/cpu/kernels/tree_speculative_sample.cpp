// The CPU kernel of fastar.tree_speculative_sample, compiled per ISA (cpu/vec.h): rows in parallel, each
// walking its tree with core/tree_acceptance.h. A row reads the p(x), q(x) scalars of the children it tries
// and makes a vectorized pass over V per rejection (the residual's mass; one more to write the weights when a
// node rejects a second child) and up to two to draw the token.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

template <typename P>
struct CpuTreeOps : TreeRowOutputs {
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

  void materialize(const TreeView<P>& v, uint64_t* dst) const {
    bool ok = true;
    pass<true>(v, 0, prm.V, dst, &ok);
  }
};

template <typename P>
void tree_sample_rows(const TreeSampleParams& prm) {
  for_each_tree_row<P>(
      prm, true, [&] { return std::vector<uint64_t>(static_cast<size_t>(prm.V)); },
      [&](int64_t b, const TreeRowOutputs& out, std::vector<uint64_t>& w, int64_t* accepted) {
        CpuTreeOps<P> ops{out};
        return tree_sample_walk<P>(prm, b, ops, w.data(), accepted);
      });
}

}  // namespace

void tree_speculative_sample(const TreeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { tree_sample_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
