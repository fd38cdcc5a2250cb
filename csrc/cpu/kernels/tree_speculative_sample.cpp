// The CPU kernel of fastar.tree_speculative_sample, compiled per ISA (cpu/vec.h): rows in parallel, each
// walking its tree with core/tree_acceptance.h. A row reads the p(x), q(x) scalars of the children it tries
// and makes a vectorized pass over V per rejection (the residual's mass; one more to write the weights when a
// node rejects a second child) and one to draw the token, whose block sums lead the inverse CDF to one block.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "core/tree_acceptance.h"
#include "cpu/acceptance_rows.h"
#include "cpu/kernels/acceptance.h"
#include "cpu/vec.h"

FASTAR_ISA_BEGIN
namespace {

// Tokens per sum that mass() keeps for find(), and per sum inside that block.
constexpr int64_t kBlock = 1024, kSub = 256;

template <typename P>
struct CpuTreeOps : TreeRowOutputs {
  uint64_t* block_sums;  // [ceil(V / kBlock)]: the last mass()'s sums

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

  // The total of v's weights, kBlock tokens at a time into block_sums; *ok: every value read is a probability.
  uint64_t mass(const TreeView<P>& v, bool* ok) const {
    uint64_t total = 0;
    bool good = true;
    for (int64_t i = 0, begin = 0; begin < prm.V; ++i, begin += kBlock) {
      bool block_ok = true;
      block_sums[i] = pass<false>(v, begin, begin + kBlock < prm.V ? begin + kBlock : prm.V, nullptr, &block_ok);
      total += block_sums[i];
      good &= block_ok;
    }
    *ok = good;
    return total;
  }

  // After mass(v): the block holding the target by block_sums, its sub-blocks of kSub tokens by their sums, then
  // one token by token.
  int64_t find(const TreeView<P>& v, uint64_t target) const {
    int64_t begin = 0;
    for (int64_t i = 0; target >= block_sums[i]; ++i, begin += kBlock) target -= block_sums[i];
    const int64_t end = begin + kBlock < prm.V ? begin + kBlock : prm.V;
    bool ok = true;
    for (; begin < end; begin += kSub) {
      const int64_t stop = begin + kSub < end ? begin + kSub : end;
      const uint64_t s = pass<false>(v, begin, stop, nullptr, &ok);
      if (target >= s) {
        target -= s;
        continue;
      }
      for (int64_t t = begin; t < stop; ++t) {
        const uint64_t w = v.weight(t, load);
        if (target < w) return t;
        target -= w;
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
  // Per thread: a row's weights [V], then the block sums.
  const size_t blocks = static_cast<size_t>((prm.V + kBlock - 1) / kBlock);
  for_each_tree_row<P>(
      prm, true, [&] { return std::vector<uint64_t>(static_cast<size_t>(prm.V) + blocks); },
      [&](int64_t b, const TreeRowOutputs& out, std::vector<uint64_t>& scratch, int64_t* accepted) {
        CpuTreeOps<P> ops{out, scratch.data() + prm.V};
        return tree_sample_walk<P>(prm, b, ops, scratch.data(), accepted);
      });
}

}  // namespace

void tree_speculative_sample(const TreeSampleParams& prm, FloatKind kind) {
  with_element_type(kind, [&](auto t) { tree_sample_rows<decltype(t)>(prm); });
}

FASTAR_ISA_END
