// The rules of the tree acceptance ops (docs/acceptance.md): fastar.tree_speculative_sample, tree_greedy_verify
// and typical_accept, shared by the CPU and CUDA kernels: the per-node checks and the walks down the tree. A
// walk's passes over V (a row's fixed-point mass, writing a weight row, the inverse CDF, an argmax, softmax
// statistics) are the backend's (`Ops`), so a CUDA block runs the same walk in every thread with block-wide
// passes. The exact rules return the same tokens on every backend; typical_accept's float32 statistics may
// differ in their last bits, so a token exactly at its threshold may go either way.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/acceptance.h"

namespace fastar {

// The tree ops' arguments. fastar.tree_greedy_verify and fastar.typical_accept read target_probs as logits and
// no draft_probs or seed.
struct TreeSampleParams {
  const void* draft_ids;  // [B, N]
  bool ids64;
  int64_t ids_sb;
  const void* parents;  // [B or 1, N]: node t's parent, -1 for a child of the root, before t
  bool par64;
  int64_t par_sb;           // 0 when every row shares the tree
  const void* draft_probs;  // [B, N, V] or null (one-hot drafts)
  int64_t dp_sb, dp_sn;
  const void* target_probs;  // [B, N+1, V]: row 0 at the root, row t + 1 after node t
  int64_t tp_sb, tp_sn;
  int32_t* path;    // [B, W], W = max_depth + 1
  int32_t* tokens;  // [B, W]
  int32_t* num_accepted;
  int64_t B, N, V, max_depth;
  bool root_in_path;   // path numbers the tree with the verified root as node 0: [0, t1 + 1, t2 + 1, ...]
  uint64_t* residual;  // CUDA scratch: tree_greedy_verify's [B, 2N], typical_accept's TypicalNode [B, N]
  PhiloxSeed seed;
  float posterior_threshold, posterior_alpha, temperature, inv_temperature;  // typical_accept's (1 / T, or 0)
};

namespace accept {

// trunc(q * mass) in float64 (one IEEE multiply: the same bits on every backend): q of the current distribution's
// fixed-point total, the draft row's weight in the units of the current weights.
FASTAR_HD uint64_t scaled_weight(float q, uint64_t mass) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__dmul_rn(static_cast<double>(q), static_cast<double>(mass)));
#else
  return static_cast<uint64_t>(static_cast<double>(q) * static_cast<double>(mass));
#endif
}

// Totals of weights stay below 2^52, so that scaled_weight's product converts exactly on every ISA: a row of
// probabilities summing past 4096 is a bad value.
constexpr uint64_t kMaxTreeMass = uint64_t{1} << 52;

// The test on weights w of total `mass`: accept iff u * q * mass < w(x) (u <= p(x) / q(x) for p = w / mass).
FASTAR_HD bool accept_weighted_draft(double u, float q, uint64_t w, uint64_t mass) {
  return u * static_cast<double>(q) * static_cast<double>(mass) < static_cast<double>(w);
}

}  // namespace accept

FASTAR_HD int64_t tree_parent(const TreeSampleParams& prm, int64_t b, int64_t t) {
  return load_index(prm.parents, prm.par64, b * prm.par_sb + t);
}

FASTAR_HD int64_t tree_draft(const TreeSampleParams& prm, int64_t b, int64_t t) {
  return load_index(prm.draft_ids, prm.ids64, b * prm.ids_sb + t);
}

// The distribution at a node, as fixed-point weights: the target row `p` (element type P), or integer weights W;
// then, with q (a draft row), the residual (row: fixed_weight(p - q); weights: max(W - scaled_weight(q, mass),
// 0), mass the total of W), or with `excluded` >= 0 that token set to 0.
template <typename P>
struct TreeView {
  const P* p;
  const uint64_t* W;
  uint64_t mass;
  const P* q;
  int64_t excluded;

  FASTAR_HD bool plain() const { return !q && excluded < 0; }
  template <typename Load>
  FASTAR_HD uint64_t weight(int64_t t, Load load) const {
    if (t == excluded) return 0;
    if (!W) return q ? accept::residual_weight(load(p, t), load(q, t)) : accept::fixed_weight(load(p, t));
    if (!q) return W[t];
    const uint64_t s = accept::scaled_weight(load(q, t), mass);
    return W[t] > s ? W[t] - s : 0;
  }
  // Whether the values weight(t) reads are probabilities (the target and draft rows').
  template <typename Load>
  FASTAR_HD bool values_ok(int64_t t, Load load) const {
    return (W || accept::prob_ok(load(p, t))) && (!q || accept::prob_ok(load(q, t)));
  }
};

// Depth of node t of row b (1: a child of the root); -1 when its parent link is not before it or its depth
// passes max_depth (the climb checks every ancestor's link but for its lower bound, which the ancestor's own
// tree_node_status checks).
FASTAR_HD int64_t tree_depth(const TreeSampleParams& prm, int64_t b, int64_t t) {
  const int64_t parent = tree_parent(prm, b, t);
  if (parent < -1 || parent >= t) return -1;
  int64_t depth = 1;
  for (int64_t a = parent; a >= 0; ++depth) {  // parents strictly decrease, so the climb ends
    const int64_t up = tree_parent(prm, b, a);
    if (up >= a || depth >= prm.max_depth) return -1;
    a = up;
  }
  return depth > prm.max_depth ? -1 : depth;
}

// Status of node t of row b, from what the rule reads of it: its parent link (tree_depth), its token id (-1: an
// absent node, never tried, nor its subtree), and, with `probabilities`, p(x) under its parent's row and q(x)
// under its own draft row.
template <typename P, typename Load>
FASTAR_HD int32_t tree_node_status(const TreeSampleParams& prm, int64_t b, int64_t t, bool probabilities, Load load) {
  using namespace accept;
  if (tree_depth(prm, b, t) < 0) return kBadTree;
  const int64_t parent = tree_parent(prm, b, t);
  const int64_t x = tree_draft(prm, b, t);
  if (x == -1) return kOk;  // padding: an absent node (ragged trees)
  if (x < 0 || x >= prm.V) return kBadTokenId;
  if (!probabilities) return kOk;
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb + (parent + 1) * prm.tp_sn;
  if (!prob_ok(load(tp, x))) return kBadValue;
  if (prm.draft_probs) {
    const P* dp = static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb + t * prm.dp_sn;
    if (!prob_ok(load(dp, x))) return kBadValue;
  }
  return kOk;
}

// Where row b's walk (docs/acceptance.md's rule, over valid nodes: tree_node_status kOk for all) stands between
// its passes over V, so that a backend may run each pass as a launch of its own. The pending pass: when
// `materialize`, base's weights are written to `scratch` (the row's [V] weight row, in place) first; then the
// total of sum's weights goes to `mass` (`ok`: every value read was a probability).
template <typename P>
struct TreeWalk {
  enum Stage : int32_t { kNode, kChildren, kResidualMass, kFinalMass };
  int32_t stage = kNode;
  int64_t node = -1, depth = 0;
  int64_t child = 0;     // the next child index to try
  int64_t bits_of = 0;   // the draw whose sampling bits pick a token here: the last rejected child's
  uint64_t total = 0;    // the view's total once a rejection has left weights
  bool as_given = true;  // the view is the target row as given
  TreeView<P> view{};
  bool materialize = false;
  TreeView<P> base{}, sum{};
  uint64_t* scratch = nullptr;
  uint64_t mass = 0;
  bool ok = true;
};

// tree_sample_step's status while a pass over V is pending (the accept:: statuses are >= 0).
constexpr int32_t kTreePassPending = -1;

// Advances row b's walk to its next pass over V (returns kTreePassPending; the caller fills w.mass and w.ok and
// steps again) or to its end (the row's status; on kOk, *accepted is the number of accepted nodes). Ops:
// ops.load(row, t) -> float; ops.find(v, target) -> the inverse CDF's token of v (its pass was the last);
// ops.emit(i, node, token): path and token slot i.
template <typename P, typename Ops>
FASTAR_HD int32_t tree_sample_step(const TreeSampleParams& prm, int64_t b, Ops& ops, TreeWalk<P>& w,
                                   int64_t* accepted) {
  using namespace accept;
  using Walk = TreeWalk<P>;
  auto load = [&](const P* row, int64_t t) { return ops.load(row, t); };
  const P* tp = static_cast<const P*>(prm.target_probs) + b * prm.tp_sb;
  const P* dp = prm.draft_probs ? static_cast<const P*>(prm.draft_probs) + b * prm.dp_sb : nullptr;
  for (;;) {
    const P* row = tp + (w.node + 1) * prm.tp_sn;
    switch (w.stage) {
      case Walk::kNode:  // the target row as given, until a rejection
        w.view = TreeView<P>{row, nullptr, 0, nullptr, -1};
        w.as_given = true;
        w.total = 0;
        w.bits_of = prm.N;
        w.child = w.node + 1;
        w.stage = Walk::kChildren;
        break;
      case Walk::kChildren: {
        int64_t c = w.child;
        while (c < prm.N && (tree_parent(prm, b, c) != w.node || tree_draft(prm, b, c) == -1)) ++c;
        w.materialize = false;
        if (c == prm.N) {  // every child failed (or a leaf): sample from the view
          w.sum = w.view;
          w.stage = Walk::kFinalMass;
          return kTreePassPending;
        }
        const int64_t x = tree_draft(prm, b, c);
        const P* qrow = dp ? dp + c * prm.dp_sn : nullptr;
        const float q = qrow ? load(qrow, x) : 1.0f;
        const double u = draw(prm.seed, b, c).accept_u;
        if (w.as_given ? accept_draft(u, load(row, x), q)
                       : accept_weighted_draft(u, q, w.view.weight(x, load), w.total)) {
          ops.emit(w.depth, c, x);
          ++w.depth;
          w.node = c;
          w.stage = Walk::kNode;
          break;
        }
        w.bits_of = c;
        w.child = c + 1;
        w.sum = TreeView<P>{row, nullptr, 0, qrow, qrow ? -1 : x};
        if (!w.as_given) {
          if (!w.view.plain()) {
            w.materialize = true;
            w.base = w.view;
            w.view = TreeView<P>{nullptr, w.scratch, 0, nullptr, -1};
          }
          w.sum = TreeView<P>{nullptr, w.view.W, w.total, qrow, qrow ? -1 : x};
        }
        w.stage = Walk::kResidualMass;
        return kTreePassPending;
      }
      case Walk::kResidualMass:
        if (!w.ok || w.mass >= kMaxTreeMass) return kBadValue;
        if (w.mass > 0) {  // else the distribution stays (p == q up to the fixed-point grid)
          w.view = w.sum;
          w.total = w.mass;
          w.as_given = false;
        }
        w.stage = Walk::kChildren;
        break;
      default:  // kFinalMass
        if (!w.ok) return kBadValue;
        if (w.mass == 0) return kZeroMass;
        ops.emit(w.depth, -1, ops.find(w.view, sample_target(draw(prm.seed, b, w.bits_of).sample_bits, w.mass)));
        *accepted = w.depth;
        return kOk;
    }
  }
}

// The whole walk of row b with the passes run in place: ops.materialize(v, dst) writes v's weights to dst (may be
// v.W itself); ops.mass(v, &ok) -> the total of v's weights (ok: every value read is a probability); the rest as
// in tree_sample_step. `scratch`: the row's weight row [V]. Returns the row's status.
template <typename P, typename Ops>
FASTAR_HD int32_t tree_sample_walk(const TreeSampleParams& prm, int64_t b, Ops& ops, uint64_t* scratch,
                                   int64_t* accepted) {
  TreeWalk<P> w;
  w.scratch = scratch;
  int32_t status;
  while ((status = tree_sample_step<P>(prm, b, ops, w, accepted)) == kTreePassPending) {
    if (w.materialize) ops.materialize(w.base, w.scratch);
    w.mass = ops.mass(w.sum, &w.ok);
  }
  return status;
}

// Whether the root-first path to node a is lexicographically before the one to node c, both at the same depth:
// at the first nodes where they part (siblings), the smaller index.
FASTAR_HD bool tree_path_before(const TreeSampleParams& prm, int64_t b, int64_t a, int64_t c) {
  for (int64_t pa = tree_parent(prm, b, a), pc = tree_parent(prm, b, c); pa != pc;
       pa = tree_parent(prm, b, a), pc = tree_parent(prm, b, c)) {
    a = pa;
    c = pc;
  }
  return a < c;
}

// fastar.tree_greedy_verify for row b over valid nodes: node t matches when its parent is the root or a matching
// node and its token is the argmax of the logits after its parent; the deepest matching node (ties: the earlier
// path) ends the path, and the argmax after it is the last token. Ops: ops.argmax(i) -> the argmax of row b's
// logit row i (0: the root, t + 1: after node t; torch's rule), -1 for a NaN; ops.note(i, value) / ops.noted(i):
// the row's scratch of 2N int64 (the argmax after node t at t, -1 when t does not match; t's depth at N + t);
// ops.emit(i, node, token) as for sampling.
template <typename Ops>
FASTAR_HD int32_t tree_greedy_walk(const TreeSampleParams& prm, int64_t b, Ops& ops, int64_t* accepted) {
  using namespace accept;
  const int64_t root = ops.argmax(0);
  if (root < 0) return kBadValue;
  int64_t best = -1, best_depth = 0;
  for (int64_t t = 0; t < prm.N; ++t) {
    const int64_t parent = tree_parent(prm, b, t), x = tree_draft(prm, b, t);
    const int64_t after_parent = parent < 0 ? root : ops.noted(parent);
    if (x == -1 || x != after_parent) {
      ops.note(t, -1);
      continue;
    }
    const int64_t after = ops.argmax(t + 1);
    if (after < 0) return kBadValue;
    const int64_t depth = parent < 0 ? 1 : ops.noted(prm.N + parent) + 1;
    ops.note(t, after);
    ops.note(prm.N + t, depth);
    if (depth > best_depth || (depth == best_depth && tree_path_before(prm, b, t, best))) {
      best = t;
      best_depth = depth;
    }
  }
  ops.emit(best_depth, -1, best < 0 ? root : ops.noted(best));
  for (int64_t t = best, i = best_depth - 1; t >= 0; t = tree_parent(prm, b, t), --i)
    ops.emit(i, t, tree_draft(prm, b, t));
  *accepted = best_depth;
  return kOk;
}

// Softmax statistics of one logit row at temperature T > 0, in float32: its max m and argmax (-1: the row holds a
// NaN), sum = sum_t exp((x_t - m) / T) and weighted = sum_t exp((x_t - m) / T) (x_t - m) / T, so that the
// entropy of softmax(x / T) is log(sum) - weighted / sum.
struct RowStats {
  float max;
  int64_t argmax;
  float sum, weighted;
};

// (x - m) / T is taken at least this: exp of it is 0 in float32, and so is its term of `weighted` (a -inf logit
// would make it 0 * -inf).
constexpr float kTypicalFloor = -200.0f;

// What typical_accept keeps of a passing node: the argmax after it, its depth, and the test of its children.
struct TypicalNode {
  int32_t argmax;  // -1: the node does not pass
  int32_t depth;
  float max, sum, threshold;
};

// Medusa's typical test of token x under a row of stats s (argmax only when temperature == 0): p(x) > min(eps,
// alpha * exp(-H)), p = softmax(logits / temperature).
FASTAR_HD TypicalNode typical_node(const TreeSampleParams& prm, const RowStats& s, int32_t depth) {
  TypicalNode n{static_cast<int32_t>(s.argmax), depth, s.max, s.sum, 0.0f};
  if (prm.temperature > 0.0f) {
#if defined(__CUDA_ARCH__)
    const float mean_z = __fdividef(s.weighted, s.sum);  // no IEEE-division subroutine: the statistics are float32
#else
    const float mean_z = s.weighted / s.sum;
#endif
    const float entropy = logf(s.sum) - mean_z;
    const float typical = prm.posterior_alpha * expf(-entropy);
    n.threshold = typical < prm.posterior_threshold ? typical : prm.posterior_threshold;
  }
  return n;
}

FASTAR_HD bool typical_pass(const TreeSampleParams& prm, const TypicalNode& parent, int64_t x, float logit) {
  if (prm.temperature == 0.0f) return x == parent.argmax;
  return expf((logit - parent.max) * prm.inv_temperature) > parent.threshold * parent.sum;
}

// fastar.typical_accept for row b over valid nodes: node t passes when its parent is the root or passes and
// typical_pass holds for its token under the parent's row; the deepest passing node (ties: the earlier path) ends
// the path, and the argmax after it is the last token. Ops: ops.stats(i) -> RowStats of row b's logit row i (0:
// the root, t + 1: after node t; collective); ops.logit(i, x) -> that row's logit of token x; ops.keep(t, node) /
// ops.kept(t): the row's TypicalNode scratch; ops.emit as for sampling.
template <typename Ops>
FASTAR_HD int32_t typical_walk(const TreeSampleParams& prm, int64_t b, Ops& ops, int64_t* accepted) {
  using namespace accept;
  const RowStats root_stats = ops.stats(0);
  if (root_stats.argmax < 0) return kBadValue;
  const TypicalNode root = typical_node(prm, root_stats, 0);
  int64_t best = -1, best_depth = 0;
  for (int64_t t = 0; t < prm.N; ++t) {
    const int64_t parent = tree_parent(prm, b, t), x = tree_draft(prm, b, t);
    const TypicalNode up = parent < 0 ? root : ops.kept(parent);
    if (x == -1 || up.argmax < 0 || !typical_pass(prm, up, x, ops.logit(parent + 1, x))) {
      ops.keep(t, TypicalNode{-1, 0, 0.0f, 0.0f, 0.0f});
      continue;
    }
    const RowStats s = ops.stats(t + 1);
    if (s.argmax < 0) return kBadValue;
    const TypicalNode node = typical_node(prm, s, up.depth + 1);
    ops.keep(t, node);
    if (node.depth > best_depth || (node.depth == best_depth && tree_path_before(prm, b, t, best))) {
      best = t;
      best_depth = node.depth;
    }
  }
  ops.emit(best_depth, -1, best < 0 ? root.argmax : ops.kept(best).argmax);
  for (int64_t t = best, i = best_depth - 1; t >= 0; t = tree_parent(prm, b, t), --i)
    ops.emit(i, t, tree_draft(prm, b, t));
  *accepted = best_depth;
  return kOk;
}

}  // namespace fastar
