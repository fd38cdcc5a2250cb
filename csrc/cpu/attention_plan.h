// The plan of the CPU attention kernel (cpu/kernels/attention.cpp): how its queries are tiled and ordered,
// which work items it runs, and which keys each step of an item computes. Index logic only, compiled once
// (not per ISA); the per-ISA driver loads, computes and writes what the plan says.
//
// A work item is (batch, kv head, query tile, kv split). Its rows are every query head of the GQA group
// times the tile's query positions. Key tiles are classified against the structured mask first
// (core/attention.h): hidden tiles are skipped, fully visible ones run without per-element mask work, and
// partial ones keep only the keys some query of the item (or of a 16-position group of it) sees, batched up
// to kBatch keys a step. The steps are planned once per query tile when the mask is the same for every
// sequence, else per item.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/attention.h"

namespace fastar::cpu {

constexpr int64_t kKeyTile = 64;
// Work items with at least this many query rows use the kernel's GEMM path (verification, prefill); fewer
// (decode) stream K and V from memory with dot / axpy loops.
constexpr int64_t kGemmMinRows = 8;
// Most keys of one step: a full key tile, or a batch of partial tiles' kept keys (plan_keys); each step
// rescales its rows' output once. Tuning: docs/design/cpu-attention.md.
constexpr int64_t kBatch = 128;
constexpr int64_t kMaxRows = 256;  // query rows (heads x positions) per work item
// Query positions per row group of plan_keys (docs/design/cpu-attention.md).
constexpr int64_t kGroup = 16;

// A work item's sequence b, kv head hkv and query tile: the tile-order positions [i0, i0 + nq).
struct AttentionItem {
  int64_t b, hkv, i0, nq;
};

// The keys a step computes: key at(c) for c < n. Batches of partial tiles list the keys that some query
// of their positions sees in idx (key positions, with j0 = 0), and whether each is visible to query
// position p0 + pos in vis[c * np + pos]; full tiles have neither.
struct TileKeys {
  int64_t j0, n;
  const int32_t* idx;
  const uint8_t* vis;
  int64_t p0, np;  // the item's query positions [p0, p0 + np) that compute them (with G > 1: all of them)
  int64_t at(int64_t c) const { return j0 + (idx ? idx[c] : c); }
};

// Steps in computing order, each with the key range [pf_begin, pf_end) to prefetch meanwhile (the next
// visited key tile). Cleared and refilled, it keeps its storage.
class KeyPlan {
 public:
  int64_t size() const { return static_cast<int64_t>(steps_.size()); }
  // Step i's keys, pointing into this plan's arrays.
  TileKeys keys(int64_t i) const {
    const Step& s = steps_[static_cast<size_t>(i)];
    TileKeys k = s.keys;
    if (k.idx) k.idx = idx_.data() + s.idx_at, k.vis = vis_.data() + s.vis_at;
    return k;
  }
  int64_t pf_begin(int64_t i) const { return steps_[static_cast<size_t>(i)].pf_begin; }
  int64_t pf_end(int64_t i) const { return steps_[static_cast<size_t>(i)].pf_end; }
  void clear();
  // Appends a step, copying keys' idx and vis.
  void add(const TileKeys& keys, int64_t pf_begin, int64_t pf_end);

 private:
  struct Step {
    TileKeys keys;
    int64_t idx_at, vis_at, pf_begin, pf_end;
  };
  std::vector<Step> steps_;
  std::vector<int32_t> idx_;
  std::vector<uint8_t> vis_;
};

class AttentionPlan {
 public:
  // Plans p for the threads of at::get_num_threads(); p must outlive the plan.
  explicit AttentionPlan(const AttentionParams& p);

  int64_t group() const { return G_; }        // query heads per kv head
  int64_t q_tile() const { return q_tile_; }  // most query positions of a tile
  int64_t n_q_tiles() const { return n_q_tiles_; }
  int64_t splits() const { return splits_; }  // kv splits per item (merged by their LSE)
  int64_t items() const { return p_.B * p_.Hkv * n_q_tiles_; }
  // Whether the Hkv items of a sequence and query tile run as one unit, their kv heads in lockstep step by step:
  // decode over a cache whose heads lie side by side in a slot ([slots, Hkv, D]), where a key tile's rows of every
  // head are one range of memory and a head's alone are scattered over it.
  bool lockstep() const { return lockstep_; }
  // The work the threads share, per split: items, or in lockstep the B x n_q_tiles() units.
  int64_t units() const { return lockstep_ ? p_.B * n_q_tiles_ : items(); }
  // Query tile qt holds the tile-order positions [tile_start(qt), tile_start(qt + 1)).
  int64_t tile_start(int64_t qt) const { return q_starts_[static_cast<size_t>(qt)]; }

  AttentionItem item_at(int64_t item) const {
    const int64_t qt = item % n_q_tiles_, bh = item / n_q_tiles_;
    const int64_t i0 = tile_start(qt);
    return AttentionItem{bh / p_.Hkv, bh % p_.Hkv, i0, tile_start(qt + 1) - i0};
  }
  // Query position of tile-order position i (in patch order under a next-scale window).
  int64_t position(int64_t i) const { return qpos_.empty() ? i : qpos_[static_cast<size_t>(i)]; }
  // Query position of the item's p-th query.
  int64_t pos_at(const AttentionItem& it, int64_t p) const { return position(it.i0 + p); }

  // The steps of split `split` of the item: steps [begin, end) of *plan, which is the shared plan of its
  // query tile or `scratch`, refilled.
  struct Steps {
    const KeyPlan* plan;
    int64_t begin, end;
  };
  Steps steps(int64_t item, int64_t split, KeyPlan& scratch) const;

 private:
  void split_query_tiles();
  // Keys past the returned end are hidden from every query of the item.
  int64_t visible_key_end(const AttentionItem& it, int64_t lk) const;
  // Appends to out the steps of the item's key tiles [t_begin, t_end).
  void plan_keys(const AttentionItem& it, int64_t t_begin, int64_t t_end, KeyPlan& out) const;
  void build_shared_plans();
  // The keys of tile [j0, j0 + nk) that some query of the item may see: their offsets from j0 go to idx,
  // and whether key idx[c] is visible to the item's query pos to vis[c * nq + pos]. Returns how many.
  int64_t visible_keys(const AttentionItem& it, int64_t j0, int64_t nk, const MaskGeometry& geom, uint8_t* vis,
                       int32_t* idx) const;

  // Block (scale) ids and the next-scale window (cpu/attention_window.cpp).
  void order_by_patches();
  int64_t visible_keys_by_runs(const AttentionItem& it, int64_t j0, int64_t nk, uint8_t* vis, int32_t* idx) const;

  const AttentionParams& p_;
  const int64_t G_;
  int64_t q_tile_ = 1, n_q_tiles_ = 1, splits_ = 1;
  std::vector<int32_t> qpos_;      // [Lq] query positions in tile order (order_by_patches), or empty: in order
  std::vector<int64_t> q_starts_;  // [n_q_tiles_ + 1] first query (in tile order) of each tile, then Lq
  bool sorted_k_blocks_ = false;
  bool lockstep_ = false;
  std::vector<KeyPlan> shared_;  // [n_q_tiles_] when built once for all sequences, else empty
};

}  // namespace fastar::cpu
