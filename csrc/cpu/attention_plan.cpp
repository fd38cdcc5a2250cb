// The CPU attention kernel's plan (cpu/attention_plan.h): query tiles, work items and key steps. The
// next-scale parts (patch order, block-id runs) are in cpu/attention_window.cpp.
#include "cpu/attention_plan.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace fastar::cpu {
namespace {

constexpr int64_t kMaxPlanBytes = 16 << 20;  // bound on Lq x Lk of the plans shared by the batch

}  // namespace

void KeyPlan::clear() {
  steps_.clear();
  idx_.clear();
  vis_.clear();
}

void KeyPlan::add(const TileKeys& keys, int64_t pf_begin, int64_t pf_end) {
  steps_.push_back(Step{keys, static_cast<int64_t>(idx_.size()), static_cast<int64_t>(vis_.size()), pf_begin, pf_end});
  if (keys.idx) {
    idx_.insert(idx_.end(), keys.idx, keys.idx + keys.n);
    vis_.insert(vis_.end(), keys.vis, keys.vis + keys.n * keys.np);
  }
}

AttentionPlan::AttentionPlan(const AttentionParams& p) : p_(p), G_(p.Hq / p.Hkv) {
  // Query positions per tile: as many as fit kMaxRows rows with the whole GQA group.
  q_tile_ = std::max<int64_t>(1, std::min<int64_t>(p.Lq, kMaxRows / G_));
  if (G_ > kMaxRows) q_tile_ = 1;
  // A precomputed tile map is exact per tile_q queries: tiles no taller skip everything it hides.
  if (p.mask.tile_map) q_tile_ = std::min(q_tile_, p.mask.tile_q);
  // A next-scale window hides most of a wide tile's keys from some of its rows only: shorter query tiles
  // leave fewer keys after compaction.
  if (p.mask.scale_window >= 0) q_tile_ = std::min<int64_t>(q_tile_, 32);
  order_by_patches();
  split_query_tiles();
  n_q_tiles_ = static_cast<int64_t>(q_starts_.size()) - 1;
  sorted_k_blocks_ = p.mask.block == BlockRelation::kCausal && p.mask.k_block_sb == 0 &&
                     std::is_sorted(p.mask.k_block_ids, p.mask.k_block_ids + p.Lk);
  // An item's steps do not depend on its kv head (only a bias does, applied by the kernel), so the heads can share
  // them in lockstep.
  lockstep_ = G_ * q_tile_ < kGemmMinRows && p.Hkv > 1 && p.k_sh < p.k_sl && p.v_sh < p.v_sl;
  // When there are too few work units for the threads (decode with a small batch), the keys are split.
  const int64_t key_tiles = (p.Lk + kKeyTile - 1) / kKeyTile;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t units = this->units();
  splits_ = units >= want ? 1 : std::max<int64_t>(1, std::min<int64_t>(key_tiles / 2, (want + units - 1) / units));
  // A mask that is the same for every sequence (a ScaleLayout's, a shared causal or tree mask) is planned
  // once per query tile instead of once per item: VAR runs 16-32 heads per tile. The plans hold a byte per
  // visible (query, key) pair of the partial tiles, at most Lq x Lk.
  const AttentionMask& m = p.mask;
  const bool shared = !p.kv_lens && (m.block == BlockRelation::kNone || (m.q_block_sb == 0 && m.k_block_sb == 0)) &&
                      (!m.bits || m.bits_sb == 0);
  if (shared && p.B * p.Hkv > 1 && p.Lq * p.Lk <= kMaxPlanBytes) build_shared_plans();
}

AttentionPlan::Steps AttentionPlan::steps(int64_t item, int64_t split, KeyPlan& scratch) const {
  if (!shared_.empty()) {
    const KeyPlan& plan = shared_[static_cast<size_t>(item % n_q_tiles_)];
    const int64_t n = plan.size(), per_split = (n + splits_ - 1) / splits_;
    return Steps{&plan, std::min(n, split * per_split), std::min(n, (split + 1) * per_split)};
  }
  const AttentionItem it = item_at(item);
  const int64_t tiles = (visible_key_end(it, kv_len(p_, it.b)) + kKeyTile - 1) / kKeyTile;
  const int64_t per_split = (tiles + splits_ - 1) / splits_, t_begin = split * per_split;
  scratch.clear();
  plan_keys(it, t_begin, std::min(tiles, t_begin + per_split), scratch);
  return Steps{&scratch, 0, scratch.size()};
}

// Query tiles of at most q_tile_ positions. With block ids shared by the batch (scales of a ScaleLayout,
// blocks of BlockCausal), a run of one id at least half a tile long starts a tile of its own, so a tile
// holds one scale (or several small ones) and sees one prefix of the keys, not a staircase of partial
// tiles.
void AttentionPlan::split_query_tiles() {
  const AttentionMask& m = p_.mask;
  q_starts_.assign(1, 0);
  const bool by_block = m.block != BlockRelation::kNone && m.q_block_sb == 0;
  for (int64_t i = 0; i < p_.Lq;) {
    int64_t run = 1;
    if (by_block)
      while (i + run < p_.Lq && m.q_block_ids[i + run] == m.q_block_ids[i]) ++run;
    if (run >= (q_tile_ + 1) / 2 && i > q_starts_.back()) q_starts_.push_back(i);
    for (int64_t j = i; j < i + run; ++j)
      if (j - q_starts_.back() == q_tile_) q_starts_.push_back(j);
    i += run;
  }
  q_starts_.push_back(p_.Lq);
}

// With the causal block relation over sorted key ids, the keys whose id exceeds the tile's largest query id.
int64_t AttentionPlan::visible_key_end(const AttentionItem& it, int64_t lk) const {
  if (!sorted_k_blocks_) return lk;
  const AttentionMask& m = p_.mask;
  const int32_t* qids = m.q_block_ids + it.b * m.q_block_sb;
  const int32_t qmax = *std::max_element(qids + it.i0, qids + it.i0 + it.nq);
  return std::upper_bound(m.k_block_ids, m.k_block_ids + lk, qmax) - m.k_block_ids;
}

// Fully visible tiles go whole. Partial tiles keep the keys some query sees; with one query head per item,
// per group of kGroup positions (a next-scale window's coarse keys are each seen by a few grid cells). Kept
// keys are batched per group, up to kBatch at a time (a window keeps about half of a tile); the online softmax
// takes keys in any order. Each step prefetches the next visited key tile.
void AttentionPlan::plan_keys(const AttentionItem& it, int64_t t_begin, int64_t t_end, KeyPlan& out) const {
  const int64_t nq = it.nq, lk = visible_key_end(it, kv_len(p_, it.b));
  const int64_t gw = G_ == 1 && nq >= 2 * kGroup ? kGroup : nq, groups = (nq + gw - 1) / gw;
  const MaskGeometry geom = mask_geometry(p_, it.b);
  uint8_t tile_vis[kKeyTile * kMaxRows], vis[kBatch * kMaxRows];  // group g's batch at vis + kBatch * g * gw
  int32_t tile_idx[kKeyTile], idx[kBatch * (kMaxRows / kGroup)];  // group g's at idx + kBatch * g
  int64_t batched[kMaxRows / kGroup] = {};
  // The tile's positions span [q_lo, q_hi) (more than nq of them in patch order): classified over the
  // span, a key tile is hidden or full only if it is for every query of the tile.
  int64_t q_lo = it.i0, q_hi = it.i0 + nq;
  if (!qpos_.empty()) {
    const auto span = std::minmax_element(qpos_.begin() + it.i0, qpos_.begin() + it.i0 + nq);
    q_lo = *span.first, q_hi = *span.second + 1;
  }
  auto tile_class = [&](int64_t t) {
    const int64_t j0 = t * kKeyTile;
    return classify_tile(p_.mask, it.b, q_lo, q_hi, j0, std::min(lk, j0 + kKeyTile), geom);
  };
  auto batch = [&](int64_t g) {
    const int64_t p0 = g * gw;
    return TileKeys{0, batched[g], idx + kBatch * g, vis + kBatch * p0, p0, std::min(gw, nq - p0)};
  };
  int64_t pf_begin = 0, pf_end = 0;
  TileClass cls = t_begin < t_end ? tile_class(t_begin) : TileClass::kHidden;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t j0 = t * kKeyTile, nk = std::min(lk, j0 + kKeyTile) - j0;
    const TileClass cur = cls;
    cls = t + 1 < t_end ? tile_class(t + 1) : TileClass::kHidden;
    if (cur == TileClass::kHidden) continue;
    pf_begin = j0 + kKeyTile, pf_end = cls == TileClass::kHidden ? pf_begin : std::min(lk, j0 + 2 * kKeyTile);
    if (cur == TileClass::kFull) {
      out.add(TileKeys{j0, nk, nullptr, nullptr, 0, nq}, pf_begin, pf_end);
      continue;
    }
    const int64_t n = visible_keys(it, j0, nk, geom, tile_vis, tile_idx);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t p0 = g * gw, np = std::min(gw, nq - p0);
      for (int64_t c = 0; c < n; ++c) {
        const uint8_t* v = tile_vis + c * nq + p0;
        if (groups > 1 && std::none_of(v, v + np, [](uint8_t x) { return x != 0; })) continue;
        if (batched[g] == kBatch) {
          out.add(batch(g), pf_begin, pf_end);
          batched[g] = 0;
        }
        std::copy(v, v + np, vis + kBatch * p0 + batched[g] * np);
        idx[kBatch * g + batched[g]++] = static_cast<int32_t>(j0 + tile_idx[c]);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    if (batched[g] > 0) out.add(batch(g), pf_end, pf_end);
}

// The key plan of every query tile, built once for all items (those of sequence 0 and kv head 0).
void AttentionPlan::build_shared_plans() {
  shared_.resize(static_cast<size_t>(n_q_tiles_));
  at::parallel_for(0, n_q_tiles_, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t qt = t0; qt < t1; ++qt) {
      const AttentionItem it = item_at(qt);
      const int64_t tiles = (visible_key_end(it, p_.Lk) + kKeyTile - 1) / kKeyTile;
      plan_keys(it, 0, tiles, shared_[static_cast<size_t>(qt)]);
    }
  });
}

// Keys no position sees are dropped, so a window's far keys cost no GEMM work.
int64_t AttentionPlan::visible_keys(const AttentionItem& it, int64_t j0, int64_t nk, const MaskGeometry& geom,
                                    uint8_t* vis, int32_t* idx) const {
  const AttentionMask& m = p_.mask;
  const int64_t nq = it.nq;
  if (m.causal || m.window || m.bits) {
    int64_t n = 0;
    for (int64_t c = 0; c < nk; ++c) {
      uint8_t* v = vis + n * nq;
      bool any = false;
      for (int64_t pos = 0; pos < nq; ++pos) {
        v[pos] = mask_visible(m, it.b, pos_at(it, pos), j0 + c, geom);
        any |= v[pos] != 0;
      }
      if (any) idx[n++] = static_cast<int32_t>(c);
    }
    return n;
  }
  if (m.block == BlockRelation::kNone && m.scale_window < 0) {
    std::fill(vis, vis + nk * nq, 1);
    for (int64_t c = 0; c < nk; ++c) idx[c] = static_cast<int32_t>(c);
    return nk;
  }
  return visible_keys_by_runs(it, j0, nk, vis, idx);
}

}  // namespace fastar::cpu
