// The CPU attention kernel, compiled once per ISA (cpu/vec.h): tiled online softmax (FlashAttention's
// recurrence) in float32.
//
// A work item is (batch, kv head, query tile, kv split). Its rows are every query head of the GQA group
// times the tile's query positions, so each K/V tile is loaded once for the whole group. Key tiles are
// classified against the structured mask first (core/attention.h): hidden tiles are skipped, fully
// visible ones run without per-element mask work, and partial ones keep only the keys some query of the
// item (or of a 16-position group of it) sees, batched up to a tile's worth. This plan of keys is made
// once per query tile when the mask is the same for every sequence, else per item. When there are too
// few work items for the threads (decode with a small batch), the keys are split and the partial results
// merged by their LSE.
#include "cpu/kernels/attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/softmax.h"
#include "cpu/kernels/microkernels.h"

FASTAR_ISA_BEGIN
namespace {

constexpr int64_t kKeyTile = 64;
// Most keys of one step: a full key tile, or a batch of partial tiles' kept keys (plan_keys). Batches of 128
// halve the steps of a window's long key lists (VAR 2240, W=2: 5-10% faster than 64); each step rescales its
// rows' output once.
constexpr int64_t kBatch = 128;
constexpr int64_t kMaxRows = 256;  // query rows (heads x positions) per work item
static_assert(2 * kKeyTile <= RowPrefetch::kMaxRows, "a key tile's K and V rows fit the prefetch list");

// Tiles with at least this many query rows use the GEMM path: compute-bound verification and prefill.
// Fewer rows (decode) stream K and V straight from memory with dot/axpy loops.
constexpr int64_t kGemmMinRows = 8;
// Query positions per row group of plan_keys: 8 computed 10% fewer logits for VAR 680, W=2, but its smaller
// GEMMs ran slower overall.
constexpr int64_t kGroup = 16;
constexpr int64_t kMaxPlanBytes = 16 << 20;  // build_plans' bound on Lq x Lk
constexpr int64_t kHeadCacheBytes = 8 << 20;  // a thread's float K and V of one head (HeadCache)
constexpr int64_t kL2Resident = 512 << 10;   // bytes: half of a 1 MB L2 (Zen 4, recent Intel)

// One query row's online softmax (core/softmax.h): its running max and sum.
using RowState = SoftmaxState<float>;
static_assert(sizeof(RowState) == 2 * sizeof(float), "row states are carved from float scratch");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t round_up16(int64_t x) { return round_up(x, 16); }
// The GEMM path's logits are computed for query columns in multiples of kColumns (zero queries pad them):
// whole vectors, and a multiple of 8 for the micro-kernels.
constexpr int64_t kColumns = kW > 8 ? kW : 8;
static_assert(16 % kColumns == 0, "padded rows (multiples of 16) hold whole column steps");

// Row stride of the GEMM path's transposed buffers (q^T, s^T) for rp rows: 16 floats more than rp, so a
// column panel read down k does not map every row to the same few L1 sets (rp = 256 is a 1 KiB stride,
// 4 of 64 sets: the panel fell out of L1 on every pass). The float K and V tiles [nk, D] get the same
// padding: at D = 128 their rows are 512 bytes apart, 8 sets.
inline int64_t padded_ld(int64_t n) { return n + 16; }

template <typename T>
class AttentionCpu {
 public:
  explicit AttentionCpu(const AttentionParams& p) : p_(p), G_(p.Hq / p.Hkv) {
    // Query positions per tile: as many as fit kMaxRows rows with the whole GQA group.
    q_tile_ = std::max<int64_t>(1, std::min<int64_t>(p.Lq, kMaxRows / G_));
    if (G_ > kMaxRows) q_tile_ = 1;
    // A precomputed tile map is exact per tile_q queries: tiles no taller skip everything it hides.
    if (p.mask.tile_map) q_tile_ = std::min(q_tile_, p.mask.tile_q);
    // A next-scale window hides most of a wide tile's keys from some of its rows only: shorter query tiles
    // leave fewer keys after compaction (VAR 680, W=2: 12% fewer logits computed at 32 than at 64).
    if (p.mask.scale_window >= 0) q_tile_ = std::min<int64_t>(q_tile_, 32);
    order_by_patches();
    split_query_tiles();
    n_q_tiles_ = static_cast<int64_t>(q_starts_.size()) - 1;
    sorted_k_blocks_ = p.mask.block == BlockRelation::kCausal && p.mask.k_block_sb == 0 &&
                       std::is_sorted(p.mask.k_block_ids, p.mask.k_block_ids + p.Lk);
    const int64_t items = p.B * p.Hkv * n_q_tiles_;
    const int64_t key_tiles = (p.Lk + kKeyTile - 1) / kKeyTile;
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    splits_ = items >= want ? 1 : std::max<int64_t>(1, std::min<int64_t>(key_tiles / 2, (want + items - 1) / items));
  }

  void run() {
    const int64_t items = p_.B * p_.Hkv * n_q_tiles_;
    const int64_t rows_cap = G_ * q_tile_, D = p_.D;
    if (splits_ > 1) {
      partial_o_.assign(static_cast<size_t>(items * splits_ * rows_cap * D), 0.0f);
      partial_state_.assign(static_cast<size_t>(items * splits_ * rows_cap), RowState::init());
    }
    // Each thread takes the next chunk of items when it is done with one: items differ in cost (masks hide
    // different parts of each), and a core that is slowed (by another VM or process) just takes fewer,
    // where fixed halves made the other core wait. A chunk is a run of consecutive items (mostly one head's
    // query tiles, whose K and V stay in the core's L2), a quarter of a thread's share of what is left, so
    // the last chunks are short and the threads finish together (OpenMP's guided schedule).
    // A mask that is the same for every sequence (a ScaleLayout's, a shared causal or tree mask) is planned
    // once per query tile instead of once per item: VAR runs 16-32 heads per tile. The plans hold a byte
    // per visible (query, key) pair of the partial tiles, at most Lq x Lk.
    const AttentionMask& m = p_.mask;
    const bool shared = !p_.kv_lens && (m.block == BlockRelation::kNone || (m.q_block_sb == 0 && m.k_block_sb == 0)) &&
                        (!m.bits || m.bits_sb == 0);
    if (shared && p_.B * p_.Hkv > 1 && p_.Lq * p_.Lk <= kMaxPlanBytes) build_plans();
    const int64_t total = items * splits_, threads = at::get_num_threads();
    // 16-bit K/V are converted once per head when several query tiles read them and the head fits.
    const bool head_cache = !std::is_same_v<T, float> && n_q_tiles_ > 1 &&
                            2 * p_.Lk * padded_ld(D) * static_cast<int64_t>(sizeof(float)) <= kHeadCacheBytes;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(total, threads), 1, [&](int64_t, int64_t) {
      Buffers unused;
      std::vector<float> scratch(static_cast<size_t>(layout_buffers(nullptr, unused)));
      HeadCache head;
      if (head_cache) {
        head.ready.resize(static_cast<size_t>((p_.Lk + kKeyTile - 1) / kKeyTile));
        head.k.resize(static_cast<size_t>(p_.Lk * padded_ld(D)));
        head.v.resize(head.k.size());
      }
      for (int64_t w0 = next.load(std::memory_order_relaxed); w0 < total;) {
        const int64_t w1 = w0 + std::max<int64_t>(1, (total - w0) / (4 * threads));
        if (!next.compare_exchange_weak(w0, w1, std::memory_order_relaxed)) continue;  // w0 reloaded
        for (int64_t w = w0; w < std::min(total, w1); ++w) run_item(w / splits_, w % splits_, scratch.data(), head_cache ? &head : nullptr);
        w0 = next.load(std::memory_order_relaxed);
      }
    });
    if (splits_ > 1) {
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t item = i0; item < i1; ++item) merge_splits(item);
      });
    }
  }

 private:
  struct Item {
    int64_t b, hkv, i0, nq;
  };

  // The float K and V rows of one head (b, hkv) [Lk, padded_ld(D)], converted a key tile at a time as the
  // GEMM path asks for them. A thread's consecutive items are mostly query tiles of one head, which now
  // convert each 16-bit row once instead of once per item and row group (13% of a VAR 680 bf16 pass).
  struct HeadCache {
    int64_t b = -1, hkv = -1;
    std::vector<uint8_t> ready;  // [key tiles]
    std::vector<float> k, v;
  };

  // Per-item buffers, carved from the thread's scratch. Rows are padded to rp (a multiple of 16).
  struct Buffers {
    float* q;     // stream: [R, D] queries * scale; GEMM: [D, ld] the same, transposed (pad rows to 8 zero)
    float* o;     // [R, D] unnormalised output
    float* s;     // stream: [R, kBatch] logits; GEMM: [kBatch, ld] transposed; then probabilities
    RowState* state;  // [rp] each row's online softmax
    float* corr;      // [rp] rescaling of o for the current step
    float* shift;     // [rp] what the step's logits are shifted by before exp (GEMM path)
    float* kf;    // [kBatch, padded_ld(D)] the step's key rows converted to float (GEMM path)
    float* vf;    // [kBatch, padded_ld(D)] the step's value rows converted to float (GEMM path)
    HeadCache* head;  // the thread's, when 16-bit K/V rows are converted once per head
    // Partial steps add p * v only for the visible pairs, so a NaN or infinite value row a mask hides from a
    // row cannot reach it through 0 * v (the fast path's products do): an item is rerun so when its output
    // holds a non-finite value.
    bool careful;
  };

  // Points buf's arrays into base (null: nowhere) and returns how many floats they take: the one place that
  // sizes and carves a thread's scratch.
  int64_t layout_buffers(float* base, Buffers& buf) const {
    const int64_t rp = round_up16(G_ * q_tile_), ld = padded_ld(rp), D = p_.D, kd = padded_ld(D);
    int64_t at = 0;
    auto take = [&](float*& array, int64_t n) {
      array = base ? base + at : nullptr;
      at += n;
    };
    take(buf.q, ld * D);
    take(buf.o, rp * D);
    take(buf.s, ld * kBatch);
    float* state;
    take(state, 2 * rp);
    buf.state = reinterpret_cast<RowState*>(state);
    take(buf.corr, rp);
    take(buf.shift, rp);
    take(buf.kf, kBatch * kd);
    take(buf.vf, kBatch * kd);
    return at;
  }


  // Query tiles of at most q_tile_ positions. With block ids shared by the batch (scales of a ScaleLayout,
  // blocks of BlockCausal), a run of one id at least half a tile long starts a tile of its own, so a tile
  // holds one scale (or several small ones) and sees one prefix of the keys, not a staircase of partial
  // tiles.
  void split_query_tiles() {
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

  // Under a next-scale window, each scale's queries are taken in 4x4 patches of its grid (row-major patch
  // order, then row-major inside the patch): a 32-query tile is then a 4x8 patch and a row group of 16 a
  // 4x4 one, which see fewer coarse keys than two grid rows and one (VAR 680, W=2: 9% fewer logits). The
  // order only permutes positions of one scale id, so the ids read by index stay those of the tile.
  void order_by_patches() {
    const AttentionMask& m = p_.mask;
    if (m.scale_window < 0 || m.block == BlockRelation::kNone || m.q_block_sb != 0) return;
    qpos_.resize(static_cast<size_t>(p_.Lq));
    for (int64_t i = 0; i < p_.Lq; ++i) qpos_[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    const int32_t* ty = m.tok_y + m.q_token_offset;
    const int32_t* tx = m.tok_x + m.q_token_offset;
    auto key = [&](int32_t i) {
      return std::make_tuple(ty[i] / 4, tx[i] / 4, ty[i] % 4, tx[i] % 4);
    };
    for (int64_t i = 0, run; i < p_.Lq; i += run) {
      for (run = 1; i + run < p_.Lq && m.q_block_ids[i + run] == m.q_block_ids[i];) ++run;
      std::stable_sort(qpos_.begin() + i, qpos_.begin() + i + run,
                       [&](int32_t a, int32_t b) { return key(a) < key(b); });
    }
  }

  // Query position of the item's p-th query (in patch order under a next-scale window).
  int64_t pos_at(const Item& it, int64_t p) const { return qpos_.empty() ? it.i0 + p : qpos_[it.i0 + p]; }

  Item item_at(int64_t item) const {
    const int64_t qt = item % n_q_tiles_, bh = item / n_q_tiles_;
    const int64_t i0 = q_starts_[qt];
    return Item{bh / p_.Hkv, bh % p_.Hkv, i0, q_starts_[qt + 1] - i0};
  }

  // Keys past the returned end are hidden from every query of the tile: with the causal block relation
  // over sorted key ids, those whose id exceeds the tile's largest query id.
  int64_t visible_key_end(const Item& it, int64_t lk) const {
    if (!sorted_k_blocks_) return lk;
    const AttentionMask& m = p_.mask;
    const int32_t* qids = m.q_block_ids + it.b * m.q_block_sb;
    const int32_t qmax = *std::max_element(qids + it.i0, qids + it.i0 + it.nq);
    return std::upper_bound(m.k_block_ids, m.k_block_ids + lk, qmax) - m.k_block_ids;
  }

  // Row r of an item is query head hkv * G + r / nq at position pos_at(it, r % nq).
  int64_t row_head(const Item& it, int64_t r) const { return it.hkv * G_ + r / it.nq; }
  int64_t row_pos(const Item& it, int64_t r) const { return pos_at(it, r % it.nq); }

  void run_item(int64_t item, int64_t split, float* scratch, HeadCache* head) {
    const Item it = item_at(item);
    const int64_t D = p_.D, R = G_ * it.nq, rp = round_up16(G_ * q_tile_), ld = padded_ld(rp);
    Buffers buf;
    layout_buffers(scratch, buf);
    const bool gemm = R >= kGemmMinRows;
    buf.head = gemm ? head : nullptr;
    if (buf.head && (head->b != it.b || head->hkv != it.hkv)) {
      std::fill(head->ready.begin(), head->ready.end(), 0);
      head->b = it.b, head->hkv = it.hkv;
    }
    load_queries(it, gemm, ld, buf.q);

    const int64_t lk = kv_len(p_, it.b);
    // Keys and values that stay in L2 from one query tile of the head to the next (a VAR 680 head's 350
    // KB) need no prefetch: its instructions made that pass slower.
    const bool prefetch = gemm && 2 * lk * D * static_cast<int64_t>(sizeof(T)) > kL2Resident;
    // GEMM blocks of a full tile: the next tile's rows are fetched across them.
    const int64_t steps = gemm_steps(kKeyTile, rp) + gemm_steps(R, D);
    RowPrefetch pf;  // GEMM path only
    auto compute = [&](const TileKeys& keys, int64_t pf_begin, int64_t pf_end) {
      if (prefetch && pf_begin < pf_end) plan_prefetch(it, pf_begin, pf_end, steps, pf);
      if (gemm) {
        tile_gemm(it, keys, buf, pf);
        pf.finish();
      } else {
        tile_stream(it, keys, buf);  // decode: the hardware prefetcher follows its streams (with ours, 20% slower)
      }
    };
    auto attempt = [&](bool careful) {
      buf.careful = careful;
      std::fill(buf.o, buf.o + R * D, 0.0f);
      std::fill(buf.state, buf.state + rp, RowState::init());
      if (plans_.empty()) {
        const int64_t tiles = (visible_key_end(it, lk) + kKeyTile - 1) / kKeyTile;
        const int64_t per_split = (tiles + splits_ - 1) / splits_;
        const int64_t t_begin = split * per_split;
        plan_keys(it, t_begin, std::min(tiles, t_begin + per_split), compute);
      } else {
        const KeyPlan& plan = plans_[static_cast<size_t>(item % n_q_tiles_)];
        const int64_t n = static_cast<int64_t>(plan.steps.size()), per_split = (n + splits_ - 1) / splits_;
        for (int64_t i = split * per_split; i < std::min(n, (split + 1) * per_split); ++i) {
          const PlanStep& s = plan.steps[static_cast<size_t>(i)];
          TileKeys keys = s.keys;
          if (keys.idx) keys.idx = plan.idx.data() + s.idx_at, keys.vis = plan.vis.data() + s.vis_at;
          compute(keys, s.pf_begin, s.pf_end);
        }
      }
    };
    attempt(false);
    if (!all_finite(buf.o, R * D)) attempt(true);
    finish_item(item, split, it, buf);
  }

  // Calls emit(keys, pf_begin, pf_end) for every batch of keys of the item's key tiles [t_begin, t_end) that
  // its queries see, and the key range [pf_begin, pf_end) to fetch meanwhile (the next visited tile). Fully
  // visible tiles go whole. Partial tiles keep the keys some query sees; with one query head per item, per
  // group of kGroup positions (a next-scale window's coarse keys are each seen by a few grid cells: VAR
  // 680, W=2, computes 8% fewer logits). Kept keys are batched per group, up to kBatch at a time (a
  // window keeps about half of a tile, and half-empty tiles ran at a lower efficiency); the online softmax
  // takes keys in any order.
  template <typename Emit>
  void plan_keys(const Item& it, int64_t t_begin, int64_t t_end, Emit&& emit) const {
    const int64_t nq = it.nq, lk = visible_key_end(it, kv_len(p_, it.b));
    const int64_t gw = G_ == 1 && nq >= 2 * kGroup ? kGroup : nq, groups = (nq + gw - 1) / gw;
    const MaskGeometry geom = mask_geometry(p_, it.b);
    uint8_t tile_vis[kKeyTile * kMaxRows], vis[kBatch * kMaxRows];  // group g's batch at vis + kBatch * g * gw
    int32_t tile_idx[kKeyTile], idx[kBatch * (kMaxRows / kGroup)];       // group g's at idx + kBatch * g
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
        emit(TileKeys{j0, nk, nullptr, nullptr, 0, nq}, pf_begin, pf_end);
        continue;
      }
      const int64_t n = visible_keys(it, j0, nk, geom, tile_vis, tile_idx);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t p0 = g * gw, np = std::min(gw, nq - p0);
        for (int64_t c = 0; c < n; ++c) {
          const uint8_t* v = tile_vis + c * nq + p0;
          if (groups > 1 && std::none_of(v, v + np, [](uint8_t x) { return x != 0; })) continue;
          if (batched[g] == kBatch) {
            emit(batch(g), pf_begin, pf_end);
            batched[g] = 0;
          }
          std::copy(v, v + np, vis + kBatch * p0 + batched[g] * np);
          idx[kBatch * g + batched[g]++] = static_cast<int32_t>(j0 + tile_idx[c]);
        }
      }
    }
    for (int64_t g = 0; g < groups; ++g)
      if (batched[g] > 0) emit(batch(g), pf_end, pf_end);
  }

  // The key plan of every query tile, built once for all items when the mask is the same for every sequence.
  void build_plans() {
    plans_.resize(static_cast<size_t>(n_q_tiles_));
    at::parallel_for(0, n_q_tiles_, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t qt = t0; qt < t1; ++qt) {
        const Item it = item_at(qt);
        KeyPlan& plan = plans_[static_cast<size_t>(qt)];
        const int64_t tiles = (visible_key_end(it, p_.Lk) + kKeyTile - 1) / kKeyTile;
        plan_keys(it, 0, tiles, [&](const TileKeys& keys, int64_t pf_begin, int64_t pf_end) {
          PlanStep s{keys, static_cast<int64_t>(plan.idx.size()), static_cast<int64_t>(plan.vis.size()), pf_begin,
                     pf_end};
          if (keys.idx) {
            plan.idx.insert(plan.idx.end(), keys.idx, keys.idx + keys.n);
            plan.vis.insert(plan.vis.end(), keys.vis, keys.vis + keys.n * keys.np);
          }
          plan.steps.push_back(s);
        });
      }
    });
  }

  // Aims pf at the K and V rows of keys [j_begin, j_end), to be fetched in `steps` steps.
  void plan_prefetch(const Item& it, int64_t j_begin, int64_t j_end, int64_t steps, RowPrefetch& pf) const {
    pf.n_rows = pf.row = pf.line = 0;
    for (int64_t j = j_begin; j < j_end; ++j) {
      pf.rows[pf.n_rows++] = reinterpret_cast<const char*>(
          static_cast<const T*>(p_.k) + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, j));
      pf.rows[pf.n_rows++] = reinterpret_cast<const char*>(
          static_cast<const T*>(p_.v) + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, j));
    }
    pf.lines_per_row = (p_.D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    pf.per_step = (pf.n_rows * pf.lines_per_row + steps - 1) / steps;
  }

  // The item's query rows times the softmax scale (and qk_norm's factor) into q: [R, D], or transposed
  // [D, ld] for the GEMM path with zero columns up to a multiple of kColumns, eight rows at a time through
  // an 8x8 transpose where the ISA has one.
  void load_queries(const Item& it, bool transposed, int64_t ld, float* q) const {
    const int64_t D = p_.D, R = G_ * it.nq, rows = transposed ? round_up(R, kColumns) : R;
    const T* qbase = static_cast<const T*>(p_.q);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int64_t nr = std::max<int64_t>(0, std::min<int64_t>(8, R - r0));
      const T* src[8];
      float f[8];
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t h = row_head(it, r0 + i);
        src[i] = qbase + it.b * p_.q_sb + h * p_.q_sh + row_pos(it, r0 + i) * p_.q_sl;
        f[i] = p_.scale;
        if (p_.qk_norm)
          f[i] *= (p_.q_scale ? p_.q_scale[h] : 1.0f) / std::max(std::sqrt(sum_squares(src[i], D)), kQkNormEps);
      }
      int64_t d = 0;
      if (transposed) {
#if FASTAR_ISA_LEVEL >= 1
        auto transpose = [&](auto all_rows) {  // rows past nr are zero queries (the GEMM's padding columns)
          for (; d + 8 <= D; d += 8) {
            Vec8 x[8];
            for (int64_t i = 0; i < 8; ++i)
              x[i] = decltype(all_rows)::value || i < nr ? Vec8::load(src[i] + d) * Vec8::broadcast(f[i]) : Vec8::zero();
            transpose8x8(x);
            for (int64_t j = 0; j < 8; ++j) x[j].store(q + (d + j) * ld + r0);
          }
        };
        if (nr == 8) transpose(std::true_type{});
        else transpose(std::false_type{});
#endif
        for (; d < D; ++d)
          for (int64_t i = 0; i < 8; ++i) q[d * ld + r0 + i] = i < nr ? to_f(src[i][d]) * f[i] : 0.0f;
      } else {
        for (int64_t i = 0; i < nr; ++i)
          for (d = 0; d < D; ++d) q[(r0 + i) * D + d] = to_f(src[i][d]) * f[i];
      }
    }
  }

  // The keys a step computes: key at(c) for c < n. Batches of partial tiles list the keys that some query
  // of their positions sees in idx (key positions, with j0 = 0), and whether each is visible to query
  // position p0 + pos in vis[c * np + pos]; full tiles have neither.
  struct TileKeys {
    int64_t j0, n;
    const int32_t* idx;
    const uint8_t* vis;
    int64_t p0, np;  // the query positions [p0, p0 + np) that compute them (with G > 1: all of the item's)
    int64_t at(int64_t c) const { return j0 + (idx ? idx[c] : c); }
  };

  // A batch of plan_keys, its idx and vis stored at idx_at and vis_at of the plan's arrays.
  struct PlanStep {
    TileKeys keys;
    int64_t idx_at, vis_at, pf_begin, pf_end;
  };
  struct KeyPlan {
    std::vector<PlanStep> steps;
    std::vector<int32_t> idx;
    std::vector<uint8_t> vis;
  };

  // The keys of the tile that some query position of the item may see: their offsets from j0 go to idx,
  // and whether key idx[c] is visible to the item's query pos to vis[c * nq + pos] (once for all heads).
  // Returns how many. Keys no position sees are dropped, so a window's far keys cost no GEMM work.
  int64_t visible_keys(const Item& it, int64_t j0, int64_t nk, const MaskGeometry& geom, uint8_t* vis,
                       int32_t* idx) const {
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
    // Masks of block (scale) ids alone go by runs of positions of one id: a key's block test and its cell
    // on the query's grid (next-scale window) are shared by the run. A cell outside the window around the
    // run's bounding box is seen by none of it; the others get a vector loop over the run.
    struct Run {
      int64_t p0, p1;
      int32_t sq, y0, y1, x0, x1;
    };
    Run runs[kMaxRows];
    int64_t n_runs = 0;
    const int32_t* qids = m.q_block_ids + it.b * m.q_block_sb + it.i0;
    const int32_t* kids = m.k_block_ids + it.b * m.k_block_sb + j0;
    int32_t qy[kMaxRows], qx[kMaxRows];  // the queries' cells
    const int32_t* ty = m.scale_window >= 0 ? qy : nullptr;
    const int32_t* tx = m.scale_window >= 0 ? qx : nullptr;
    if (ty) {
      for (int64_t pos = 0; pos < nq; ++pos) {
        qy[pos] = m.tok_y[pos_at(it, pos) + m.q_token_offset];
        qx[pos] = m.tok_x[pos_at(it, pos) + m.q_token_offset];
      }
    }
    for (int64_t p0 = 0, p1; p0 < nq; p0 = p1) {
      Run& r = runs[n_runs++];
      r = Run{p0, p0, qids[p0], 0, 0, 0, 0};
      for (p1 = p0 + 1; p1 < nq && qids[p1] == r.sq; ++p1) {
      }
      r.p1 = p1;
      if (ty) {
        r.y0 = *std::min_element(ty + p0, ty + p1), r.y1 = *std::max_element(ty + p0, ty + p1);
        r.x0 = *std::min_element(tx + p0, tx + p1), r.x1 = *std::max_element(tx + p0, tx + p1);
      }
    }
    const int64_t w = m.scale_window;
    const uint32_t span = static_cast<uint32_t>(2 * w);
    int64_t n = 0;
    for (int64_t c = 0; c < nk; ++c) {
      uint8_t* v = vis + n * nq;
      const int32_t sk = kids[c];
      bool any = false;
      for (int64_t ri = 0; ri < n_runs; ++ri) {
        const Run& r = runs[ri];
        const bool keep = block_visible(m.block, r.sq, sk);
        if (!keep || w < 0 || scale_window_exempt(m, r.sq, sk)) {
          std::fill(v + r.p0, v + r.p1, keep);
          any |= keep;
          continue;
        }
        const GridCell cell = scale_window_cell(m, j0 + c, r.sq, sk);
        if (cell.y < r.y0 - w || cell.y > r.y1 + w || cell.x < r.x0 - w || cell.x > r.x1 + w) {
          std::fill(v + r.p0, v + r.p1, 0);
          continue;
        }
        any = true;  // perhaps: a row of zeros left over only computes -inf logits
        // scale_window_near with the cell's offset folded in: |d| <= w iff d + w, unsigned, <= 2w.
        const int32_t oy = static_cast<int32_t>(cell.y + w), ox = static_cast<int32_t>(cell.x + w);
        for (int64_t pos = r.p0; pos < r.p1; ++pos)
          v[pos] = (static_cast<uint32_t>(oy - ty[pos]) <= span) & (static_cast<uint32_t>(ox - tx[pos]) <= span);
      }
      if (any) idx[n++] = static_cast<int32_t>(c);
    }
    return n;
  }

  // Applies keys.vis to logit (r, c) of the tile at s[r * rs + c * cs], for the rows of the keys' positions:
  // -inf where hidden, + bias.
  void apply_mask(const Item& it, const TileKeys& keys, float* s, int64_t rs, int64_t cs) const {
    const AttentionMask& m = p_.mask;
    const int64_t nq = it.nq, n = keys.n, p0 = keys.p0, np = keys.np;
    const uint8_t* vis = keys.vis;
    if (m.bias) {
      const T* bias = static_cast<const T*>(m.bias);
      for (int64_t g = 0; g < G_; ++g) {
        for (int64_t c = 0; c < n; ++c) {
          const T* bcol = bias + it.b * m.bias_sb + (it.hkv * G_ + g) * m.bias_sh + keys.at(c);
          for (int64_t pos = 0; pos < np; ++pos) {
            float& x = s[(g * nq + p0 + pos) * rs + c * cs];
            x = vis[c * np + pos] ? x + to_f(bcol[pos_at(it, p0 + pos) * m.bias_sq]) : kNegInf;
          }
        }
      }
      return;
    }
    // The inner loop runs along the unit stride of s.
    for (int64_t g = 0; g < G_; ++g) {
      if (rs == 1) {
        for (int64_t c = 0; c < n; ++c) {
          float* x = s + g * nq + p0 + c * cs;
          const uint8_t* v = vis + c * np;
          int64_t pos = 0;
          for (; pos + kW <= np; pos += kW) hide(Vec::load(x + pos), v + pos, kW).store(x + pos);
          for (; pos < np; ++pos) x[pos] = v[pos] ? x[pos] : kNegInf;
        }
      } else {
        for (int64_t pos = 0; pos < np; ++pos)
          for (int64_t c = 0; c < n; ++c) {
            float& x = s[(g * nq + p0 + pos) * rs + c * cs];
            x = vis[c * np + pos] ? x : kNegInf;
          }
      }
    }
  }

  // qk_norm: logit (r, c) at s[r * rs + c * cs], r < R, is divided by |k_c|.
  void normalise_keys(const Item& it, const TileKeys& keys, float* s, int64_t rs, int64_t cs, int64_t R) const {
    const T* kbase = static_cast<const T*>(p_.k);
    for (int64_t c = 0; c < keys.n; ++c) {
      const T* krow = kbase + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, keys.at(c));
      const float inv = 1.0f / std::max(std::sqrt(sum_squares(krow, p_.D)), kQkNormEps);
      for (int64_t r = 0; r < R; ++r) s[r * rs + c * cs] *= inv;
    }
  }

  // Streaming path of the few-row tiles (decode): K and V rows are read from memory once per tile, key by
  // key (reading eight keys side by side measured 15% slower from DRAM). The output stays in registers
  // across the tile's value rows, so no store-to-load chain runs through o.
  void tile_stream(const Item& it, const TileKeys& keys, Buffers& buf) {
    const int64_t D = p_.D, R = G_ * it.nq, nk = keys.n;
    const T* kbase = static_cast<const T*>(p_.k);
    const T* vbase = static_cast<const T*>(p_.v);
    for (int64_t c = 0; c < nk; ++c) {
      const T* krow = kbase + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, keys.at(c));
      for (int64_t r = 0; r < R; ++r) buf.s[r * kBatch + c] = dot_row(buf.q + r * D, krow, D);
    }
    if (p_.qk_norm) normalise_keys(it, keys, buf.s, kBatch, 1, R);
    if (keys.vis) apply_mask(it, keys, buf.s, kBatch, 1);
    // Online softmax: what was accumulated so far is rescaled by exp(m_old - m_new).
    for (int64_t r = 0; r < R; ++r) {
      float* srow = buf.s + r * kBatch;
      RowState& st = buf.state[r];
      const float corr = st.update(max_of(srow, nk, kNegInf));
      st.add(exp_shift_sum(srow, nk, st.shift()));
      if (corr != 1.0f) {
        for (int64_t d = 0; d < D; ++d) buf.o[r * D + d] *= corr;
      }
    }
    const T* vrows[kBatch];
    for (int64_t c = 0; c < nk; ++c)
      vrows[c] = vbase + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, keys.at(c));
    if (buf.careful && keys.vis) {
      masked_values(keys, 0, R, [&](int64_t r, int64_t c) { return buf.s[r * kBatch + c]; }, vrows, buf, false);
      return;
    }
    for (int64_t r = 0; r < R; ++r) axpy_row(buf.o + r * D, buf.s + r * kBatch, vrows, nk, D);
  }

  // o[r] (* corr[r] when rescale) += sum over the keys row r sees of p(r, c) * v_c, for rows [r0, r0 + nr).
  // Row r is query position (r - r0) % np of the keys' positions (every head of a GQA group shares them).
  template <typename P, typename V>
  void masked_values(const TileKeys& keys, int64_t r0, int64_t nr, P&& p, const V* const* vrows, Buffers& buf,
                     bool rescale) const {
    const int64_t D = p_.D;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      float* o = buf.o + r * D;
      if (rescale)
        for (int64_t d = 0; d < D; ++d) o[d] *= buf.corr[r];
      const int64_t pos = (r - r0) % keys.np;
      for (int64_t c = 0; c < keys.n; ++c) {
        if (!keys.vis[c * keys.np + pos]) continue;
        const float w = p(r, c);
        for (int64_t d = 0; d < D; ++d) o[d] += w * to_f(vrows[c][d]);
      }
    }
  }

  // Pointers to the rows of the keys' K (or V) in float: where they lie for a float cache; else in the
  // thread's head cache, or converted into dst [n, padded_ld(D)]. Value rows are read down their columns by
  // the GEMM, so float rows a multiple of 512 bytes apart (D = 128) are copied to padded rows too: in
  // place, a column panel fell on 8 L1 sets.
  void float_rows(const Item& it, const TileKeys& keys, bool value, const Buffers& buf, const float** rows) const {
    const T* base = static_cast<const T*>(value ? p_.v : p_.k);
    const int64_t sb = value ? p_.v_sb : p_.k_sb, sh = value ? p_.v_sh : p_.k_sh, sl = value ? p_.v_sl : p_.k_sl;
    const int64_t ld = padded_ld(p_.D);
    if (HeadCache* hc = buf.head) {
      for (int64_t c = 0; c < keys.n; ++c) {
        const int64_t j = keys.at(c), t = j / kKeyTile;
        if (!hc->ready[static_cast<size_t>(t)]) {  // the tile's K and V rows, both wanted by the same keys
          for (int64_t r = t * kKeyTile; r < std::min(kv_len(p_, it.b), (t + 1) * kKeyTile); ++r) {
            to_float_row(static_cast<const T*>(p_.k) + kv_row_offset(p_, p_.k_sb, p_.k_sh, p_.k_sl, it.b, it.hkv, r),
                         hc->k.data() + r * ld, p_.D);
            to_float_row(static_cast<const T*>(p_.v) + kv_row_offset(p_, p_.v_sb, p_.v_sh, p_.v_sl, it.b, it.hkv, r),
                         hc->v.data() + r * ld, p_.D);
          }
          hc->ready[static_cast<size_t>(t)] = 1;
        }
        rows[c] = (value ? hc->v : hc->k).data() + j * ld;
      }
      return;
    }
    const bool in_place = std::is_same_v<T, float> && !(value && sl * 4 % 512 == 0);
    if (in_place && !p_.block_table) {  // the common case, without a page lookup per row
      const float* head = reinterpret_cast<const float*>(base + it.b * sb + it.hkv * sh);
      for (int64_t c = 0; c < keys.n; ++c) rows[c] = head + keys.at(c) * sl;
      return;
    }
    float* dst = value ? buf.vf : buf.kf;
    for (int64_t c = 0; c < keys.n; ++c) {
      const T* row = base + kv_row_offset(p_, sb, sh, sl, it.b, it.hkv, keys.at(c));
      if (in_place) {
        rows[c] = reinterpret_cast<const float*>(row);
      } else {
        to_float_row(row, dst + c * ld, p_.D);
        rows[c] = dst + c * ld;
      }
    }
  }

  // GEMM path of the many-row tiles. The logits are computed transposed, s^T[nk, rp] = K q^T, so K is
  // read row by row as it lies (no transpose per tile) and the softmax runs down the columns, eight
  // query rows per vector; o[R, D] = o * corr + P V then reads P = s^T transposed.
  void tile_gemm(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    // The step's rows [r0, r0 + nr): its positions with G = 1, else every row; r0 is a multiple of 16, so the
    // GEMM's columns [r0, r0 + cols) stay inside q^T's rp (the padding columns hold zero queries).
    const int64_t D = p_.D, rp = round_up16(G_ * q_tile_), ld = padded_ld(rp), d8 = D / 8 * 8, nk = keys.n;
    const int64_t r0 = G_ == 1 ? keys.p0 : 0, nr = G_ == 1 ? keys.np : G_ * it.nq, cols = round_up(nr, kColumns);
    const float *krows[kBatch], *vrows[kBatch];
    float_rows(it, keys, false, buf, krows);
    gemm<Gemm::kLogits>(nk, cols, D, GemmOperands{krows, nullptr, 0, buf.q + r0, ld, nullptr}, buf.s + r0, ld, nullptr,
                        pf);
    if (p_.qk_norm) normalise_keys(it, keys, buf.s + r0, 1, ld, cols);
    // With one query head and no bias, the max pass applies the mask too (one pass over s less): a column of
    // kW rows reads its kW visibility bytes per key; rows past the step's np read as hidden.
    const bool mask_in_max = keys.vis && G_ == 1 && !p_.mask.bias;
    if (keys.vis && !mask_in_max) apply_mask(it, keys, buf.s, 1, ld);
    for (int64_t r = r0; r < r0 + cols; r += kW) {
      Vec mx = Vec::broadcast(kNegInf);
      if (mask_in_max) {
        const int left = static_cast<int>(std::min<int64_t>(kW, keys.np - (r - r0)));
        const uint8_t* v = keys.vis + (r - r0);
        for (int64_t c = 0; c < nk; ++c, v += keys.np) {
          const Vec x = hide(Vec::load(buf.s + c * ld + r), v, left);
          x.store(buf.s + c * ld + r);
          mx = max(mx, x);
        }
      } else {
        for (int64_t c = 0; c < nk; ++c) mx = max(mx, Vec::load(buf.s + c * ld + r));
      }
      // The rows' states take the column's max (one row per lane); the exp pass is vectorised.
      float lanes[kW];
      mx.store(lanes);
      for (int i = 0; i < kW; ++i) {
        buf.corr[r + i] = buf.state[r + i].update(lanes[i]);
        buf.shift[r + i] = buf.state[r + i].shift();
      }
      const Vec shift = Vec::load(buf.shift + r);
      Vec sum = Vec::zero();
      for (int64_t c = 0; c < nk; ++c) {
        const Vec e = exp(Vec::load(buf.s + c * ld + r) - shift);
        e.store(buf.s + c * ld + r);
        sum = sum + e;
      }
      sum.store(lanes);
      for (int i = 0; i < kW; ++i) buf.state[r + i].add(lanes[i]);
    }
    float_rows(it, keys, true, buf, vrows);
    if (buf.careful && keys.vis) {
      masked_values(keys, r0, nr, [&](int64_t r, int64_t c) { return buf.s[c * ld + r]; }, vrows, buf, true);
      return;
    }
    if (d8 > 0)
      gemm<Gemm::kValues>(nr, d8, nk, GemmOperands{nullptr, buf.s + r0, ld, nullptr, 0, vrows}, buf.o + r0 * D, D,
                          buf.corr + r0, pf);
    for (int64_t r = r0; r < r0 + nr; ++r) {
      for (int64_t d = d8; d < D; ++d) {
        float acc = buf.o[r * D + d] * buf.corr[r];
        for (int64_t c = 0; c < nk; ++c) acc += buf.s[c * ld + r] * vrows[c][d];
        buf.o[r * D + d] = acc;
      }
    }
  }

  void finish_item(int64_t item, int64_t split, const Item& it, const Buffers& buf) {
    const int64_t D = p_.D, R = G_ * it.nq, rows_cap = G_ * q_tile_;
    if (splits_ > 1) {
      const int64_t base = (item * splits_ + split) * rows_cap;
      for (int64_t r = 0; r < R; ++r) {
        partial_state_[static_cast<size_t>(base + r)] = buf.state[r];
        std::copy(buf.o + r * D, buf.o + (r + 1) * D, partial_o_.begin() + (base + r) * D);
      }
      return;
    }
    for (int64_t r = 0; r < R; ++r) write_row(it, r, buf.o + r * D, buf.state[r]);
  }

  void merge_splits(int64_t item) {
    const Item it = item_at(item);
    const int64_t D = p_.D, R = G_ * it.nq, rows_cap = G_ * q_tile_;
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t r = 0; r < R; ++r) {
      RowState st = RowState::init();
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t sp = 0; sp < splits_; ++sp) {
        const int64_t idx = (item * splits_ + sp) * rows_cap + r;
        const RowState::MergeWeights w = st.merge(partial_state_[static_cast<size_t>(idx)]);
        const float* po = partial_o_.data() + idx * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * w.self + po[d] * w.other;
      }
      write_row(it, r, acc.data(), st);
    }
  }

  // Normalise and store one row; a row that saw no key gets 0 and LSE -inf.
  void write_row(const Item& it, int64_t r, const float* o, const RowState& st) {
    const int64_t h = row_head(it, r), i = row_pos(it, r);
    T* dst = static_cast<T*>(p_.out) + it.b * p_.o_sb + h * p_.o_sh + i * p_.o_sl;
    const float inv = st.inv_l();
    for (int64_t d = 0; d < p_.D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    if (p_.lse) p_.lse[(it.b * p_.Hq + h) * p_.Lq + i] = st.lse();
  }

  const AttentionParams& p_;
  const int64_t G_;
  int64_t q_tile_ = 1, n_q_tiles_ = 1, splits_ = 1;
  std::vector<int32_t> qpos_;      // [Lq] query positions in tile order (order_by_patches), or empty: in order
  std::vector<int64_t> q_starts_;  // [n_q_tiles_ + 1] first query (in tile order) of each tile, then Lq
  bool sorted_k_blocks_ = false;
  std::vector<float> partial_o_;
  std::vector<RowState> partial_state_;  // [items, splits_, rows] each split's row states, to merge
  std::vector<KeyPlan> plans_;  // [n_q_tiles_] when built once for all sequences (build_plans), else empty
};

}  // namespace

void attention(const AttentionParams& p, FloatKind kind) {
  switch (kind) {
    case FloatKind::kFloat32:
      return AttentionCpu<float>(p).run();
    case FloatKind::kFloat16:
      return AttentionCpu<c10::Half>(p).run();
    case FloatKind::kBFloat16:
      return AttentionCpu<c10::BFloat16>(p).run();
  }
}

FASTAR_ISA_END
