// The CPU attention kernel, compiled once per ISA (cpu/vec.h): tiled online softmax (FlashAttention's
// recurrence) in float32.
//
// The plan (cpu/attention_plan.h, compiled once) says which work items there are and which keys each of
// their steps computes. This driver runs the items over the threads: it loads an item's queries (every
// query head of the GQA group times the tile's positions, so each K/V tile is loaded once for the whole
// group), computes each step's logits, masks them with the plan's visibility bytes and folds them into the
// online softmax (core/softmax.h, shared with the CUDA kernels), then writes the rows, or merges the kv
// splits' partial states. With bfloat16 queries over int8 / fp8 codes on a CPU with AMX, the GEMM path runs on
// tiles (tile_amx).
#include "cpu/kernels/attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/softmax.h"
#include "cpu/attention_plan.h"
#include "cpu/kernels/amx.h"
#include "cpu/kernels/microkernels.h"

FASTAR_ISA_BEGIN
namespace {

static_assert(2 * kKeyTile <= RowPrefetch::kMaxRows && 4 * kKeyTile <= RowPrefetch::kMaxLines,
              "a key tile's K and V rows and scales (two lines per key and array in lockstep) fit the prefetch lists");

constexpr int64_t kHeadCacheBytes = 8 << 20;  // a thread's float K and V of one head (HeadCache)
constexpr int64_t kL2Resident = 512 << 10;    // bytes: half of a 1 MB L2 (Zen 4, recent Intel)

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
  explicit AttentionCpu(const AttentionParams& p)
      : p_(p),
        plan_(p),
        G_(plan_.group()),
        q_tile_(plan_.q_tile()),
        n_q_tiles_(plan_.n_q_tiles()),
        splits_(plan_.splits()),
        kv_bytes_(p.kv_quantized ? 1 : static_cast<int64_t>(sizeof(T))),
        amx_(amx_applies(p)) {}

  void run() {
    const int64_t items = plan_.items(), units = plan_.units();
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
    const int64_t total = units * splits_, threads = at::get_num_threads();
    // 16-bit K/V are converted once per head when several query tiles read them and the head fits.
    const bool head_cache = (!std::is_same_v<T, float> || p_.kv_quantized) && n_q_tiles_ > 1 &&
                            2 * p_.Lk * padded_ld(D) * static_cast<int64_t>(sizeof(float)) <= kHeadCacheBytes;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(total, threads), 1, [&](int64_t, int64_t) {
      Buffers unused;
      const int64_t shared = layout_buffers(nullptr, unused);
      std::vector<Buffers> heads(static_cast<size_t>(plan_.lockstep() ? p_.Hkv : 0));
      std::vector<float> scratch(static_cast<size_t>(shared + static_cast<int64_t>(heads.size()) * head_floats()));
      for (size_t h = 0; h < heads.size(); ++h) layout_head(scratch.data(), shared + h * head_floats(), heads[h]);
      HeadCache head;
      KeyPlan item_plan;  // an item's steps, where the plan shares none over the batch
      if (head_cache) {
        head.ready.resize(static_cast<size_t>((p_.Lk + kKeyTile - 1) / kKeyTile));
        head.k.resize(static_cast<size_t>(p_.Lk * padded_ld(D)));
        head.v.resize(head.k.size());
      }
      for (int64_t w0 = next.load(std::memory_order_relaxed); w0 < total;) {
        const int64_t w1 = w0 + std::max<int64_t>(1, (total - w0) / (4 * threads));
        if (!next.compare_exchange_weak(w0, w1, std::memory_order_relaxed)) continue;  // w0 reloaded
        for (int64_t w = w0; w < std::min(total, w1); ++w) {
          if (plan_.lockstep())
            run_unit(w / splits_, w % splits_, heads.data(), item_plan);
          else
            run_item(w / splits_, w % splits_, scratch.data(), head_cache ? &head : nullptr, item_plan);
        }
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
  using Item = AttentionItem;

  // The float K and V rows of one head (b, hkv) [Lk, padded_ld(D)], converted a key tile at a time as the
  // GEMM path asks for them: a thread's consecutive items are mostly query tiles of one head, so each 16-bit
  // row is converted once, not once per item and row group.
  struct HeadCache {
    int64_t b = -1, hkv = -1;
    std::vector<uint8_t> ready;  // [key tiles]
    std::vector<float> k, v;
  };

  // Per-item buffers, carved from the thread's scratch. Rows are padded to rp (a multiple of 16).
  struct Buffers {
    float* q;         // stream: [R, D] queries * scale; GEMM: [D, ld] the same, transposed (pad rows to 8 zero)
    float* o;         // [R, D] unnormalised output
    float* s;         // stream: [R, kBatch] logits; GEMM: [kBatch, ld] transposed; then probabilities
    RowState* state;  // [rp] each row's online softmax
    float* corr;      // [rp] rescaling of o for the current step
    float* kf;        // [kBatch, padded_ld(D)] the step's key rows converted to float (GEMM path)
    float* vf;        // [kBatch, padded_ld(D)] the step's value rows converted to float (GEMM path)
    HeadCache* head;  // the thread's, when 16-bit K/V rows are converted once per head
    float* qs;        // [R, D] decode over KIVI keys: q times the scales of the key group at slot k_group
    float* qz;        // [rp] q . zeros of that group
    int64_t k_group;  // the first slot of that key group; -1: none yet
    // Decode over int8 codes with 16-bit queries: the queries rounded to int16 ([R, D], in qs's memory) with their
    // scales (in qz), for dot_keys's integer path; false: the float path.
    bool q_i16;
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
    take(buf.kf, kBatch * kd);
    take(buf.vf, kBatch * kd);
    take(buf.qs, rp * D);
    take(buf.qz, rp);
    return at;
  }

  // A kv head's own buffers in lockstep (run_unit): q, o, state, qs and qz at base + at, the rest base's (those of
  // layout_buffers, which one tile_stream call uses and leaves).
  int64_t head_floats() const { return round_up16(G_ * q_tile_) * (3 * p_.D + 3); }
  void layout_head(float* base, int64_t at, Buffers& buf) const {
    const int64_t rp = round_up16(G_ * q_tile_), D = p_.D;
    layout_buffers(base, buf);
    buf.q = base + at;
    buf.o = buf.q + rp * D;
    buf.qs = buf.o + rp * D;
    buf.state = reinterpret_cast<RowState*>(buf.qs + rp * D);
    buf.qz = buf.qs + rp * D + 2 * rp;
    buf.head = nullptr;
  }

  int64_t pos_at(const Item& it, int64_t p) const { return plan_.pos_at(it, p); }
  Item item_at(int64_t item) const { return plan_.item_at(item); }

  // Row r of an item is query head hkv * G + r / nq at position pos_at(it, r % nq).
  int64_t row_head(const Item& it, int64_t r) const { return it.hkv * G_ + r / it.nq; }
  int64_t row_pos(const Item& it, int64_t r) const { return pos_at(it, r % it.nq); }

  void run_item(int64_t item, int64_t split, float* scratch, HeadCache* head, KeyPlan& item_plan) {
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
    const bool amx = gemm && amx_;
    if (amx)
      load_queries_bf16(it, reinterpret_cast<uint16_t*>(buf.q));
    else
      load_queries(it, gemm, ld, buf.q);
    round_queries(R, gemm, buf);
    buf.k_group = -1;

    const int64_t lk = kv_len(p_, it.b);
    // The GEMM path prefetches unless the head's K and V stay in L2 from one query tile to the next; decode always
    // (its loads wait on memory without it, even on a contiguous [B, Hkv, S, D] cache).
    const bool prefetch = !gemm || 2 * lk * D * kv_bytes_ > kL2Resident;
    // GEMM blocks of a full tile, its keys, or (AMX) its softmax's rows: the next tile's rows are fetched across them.
    const int64_t steps = amx ? R : gemm ? gemm_steps(kKeyTile, rp) + gemm_steps(R, D) : kKeyTile;
    RowPrefetch pf;
    auto compute = [&](const TileKeys& keys, int64_t pf_begin, int64_t pf_end) {
      if (prefetch && pf_begin < pf_end) plan_prefetch(it, pf_begin, pf_end, steps, pf);
#if FASTAR_ISA_LEVEL >= 2
      if (amx && !buf.careful) return tile_amx(it, keys, buf, pf);
#endif
      if (gemm) {
        tile_gemm(it, keys, buf, pf);
        pf.finish();
      } else {
        tile_stream(it, keys, buf, pf);
      }
    };
    const AttentionPlan::Steps todo = plan_.steps(item, split, item_plan);
    auto attempt = [&](bool careful) {
      buf.careful = careful;
      std::fill(buf.o, buf.o + R * D, 0.0f);
      std::fill(buf.state, buf.state + rp, RowState::init());
      for (int64_t i = todo.begin; i < todo.end; ++i)
        compute(todo.plan->keys(i), todo.plan->pf_begin(i), todo.plan->pf_end(i));
    };
#if FASTAR_ISA_LEVEL >= 2
    if (amx) amx_configure();
#endif
    attempt(false);
#if FASTAR_ISA_LEVEL >= 2
    if (amx) amx_release();
#endif
    if (!all_finite(buf.o, R * D)) {
      if (amx) load_queries(it, true, ld, buf.q);  // the careful attempt runs the float32 GEMM path
      attempt(true);
    }
    finish_item(item, split, it, buf);
  }

  // The Hkv items of sequence unit / n_q_tiles_ and its query tile unit % n_q_tiles_ (plan_.lockstep(), decode):
  // each step's keys for every kv head in turn, with heads[h] the buffers of head h, while the next step's rows of
  // every head (one range per slot) are prefetched. A head whose output is not finite is rerun alone, carefully.
  void run_unit(int64_t unit, int64_t split, Buffers* heads, KeyPlan& item_plan) {
    const int64_t H = p_.Hkv, D = p_.D, b = unit / n_q_tiles_, qt = unit % n_q_tiles_;
    auto item_of = [&](int64_t h) { return (b * H + h) * n_q_tiles_ + qt; };
    const Item first = item_at(item_of(0));
    const int64_t R = G_ * first.nq, rp = round_up16(G_ * q_tile_);
    for (int64_t h = 0; h < H; ++h) {
      load_queries(item_at(item_of(h)), false, 0, heads[h].q);
      round_queries(R, false, heads[h]);
      heads[h].k_group = -1;
    }
    const AttentionPlan::Steps todo = plan_.steps(item_of(0), split, item_plan);  // every head's (attention_plan.h)
    RowPrefetch pf;
    auto attempt = [&](int64_t h0, int64_t h1, bool careful) {
      for (int64_t h = h0; h < h1; ++h) {
        heads[h].careful = careful;
        std::fill(heads[h].o, heads[h].o + R * D, 0.0f);
        std::fill(heads[h].state, heads[h].state + rp, RowState::init());
      }
      for (int64_t i = todo.begin; i < todo.end; ++i) {
        const TileKeys keys = todo.plan->keys(i);
        const int64_t pf_begin = todo.plan->pf_begin(i), pf_end = todo.plan->pf_end(i);
        if (pf_begin < pf_end) plan_prefetch(first, pf_begin, pf_end, (h1 - h0) * kKeyTile, pf, true);
        for (int64_t h = h0; h < h1; ++h) tile_stream(item_at(item_of(h)), keys, heads[h], pf);
      }
    };
    attempt(0, H, false);
    for (int64_t h = 0; h < H; ++h) {
      if (!all_finite(heads[h].o, R * D)) attempt(h, h + 1, true);
      finish_item(item_of(h), split, item_at(item_of(h)), heads[h]);
    }
  }

  // The GEMM path on AMX tiles: bfloat16 queries over int8 / fp8 codes, which bfloat16 holds exactly (their scales
  // and the softmax scale applied to the logits and to P), P rounded to bfloat16 as the CUDA tensor-core kernels
  // round it. Not with qk_norm (the queries would be scaled first).
  static bool amx_applies(const AttentionParams& p) {
#if FASTAR_ISA_LEVEL >= 2
    return std::is_same_v<T, c10::BFloat16> && p.kv_quantized && !p.kivi_bits && !p.qk_norm && p.D % 32 == 0 &&
           amx_usable();
#else
    return false;
#endif
  }

  // Aims pf at the K and V rows of keys [j_begin, j_end) and at the cache lines of their scales, to be fetched in
  // `steps` steps: the item's head's rows, or with all_heads the run of every head's rows in each slot (from head
  // 0's to the end of head Hkv - 1's).
  void plan_prefetch(const Item& it, int64_t j_begin, int64_t j_end, int64_t steps, RowPrefetch& pf,
                     bool all_heads = false) const {
    pf.n_rows = pf.row = pf.line = pf.n_lines = pf.next_line = 0;
    const char* last[2] = {nullptr, nullptr};  // the line of each scale array's last entry
    const Item last_head{it.b, p_.Hkv - 1, it.i0, it.nq};
    for (int64_t j = j_begin; j < j_end; ++j) {
      for (const bool value : {false, true}) {
        pf.rows[pf.n_rows++] = static_cast<const char*>(value ? p_.v : p_.k) + row_offset(it, value, j) * kv_bytes_;
        if (!p_.kv_quantized || p_.kivi_bits) continue;  // KIVI's scales and zeros are read by its conversion
        const float* scales = value ? p_.v_scale : p_.k_scale;
        for (const Item& at : {it, last_head}) {
          const char* line = reinterpret_cast<const char*>(
              reinterpret_cast<uintptr_t>(scales + scale_offset(at, value, j)) & ~uintptr_t{63});
          if (line != last[value]) pf.lines[pf.n_lines++] = last[value] = line;
          if (!all_heads) break;
        }
      }
    }
    const int64_t row_bytes = p_.kv_quantized && p_.kivi_bits ? p_.D * p_.kivi_bits / 8 : p_.D * kv_bytes_;
    const int64_t span = (all_heads ? (p_.Hkv - 1) * std::max(p_.k_sh, p_.v_sh) * kv_bytes_ : 0) + row_bytes;
    pf.lines_per_row = (span + 63) / 64;
    pf.per_step = (pf.n_lines + pf.n_rows * pf.lines_per_row + steps - 1) / steps;
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
              x[i] =
                  decltype(all_rows)::value || i < nr ? Vec8::load(src[i] + d) * Vec8::broadcast(f[i]) : Vec8::zero();
            transpose8x8(x);
            for (int64_t j = 0; j < 8; ++j) x[j].store(q + (d + j) * ld + r0);
          }
        };
        if (nr == 8)
          transpose(std::true_type{});
        else
          transpose(std::false_type{});
#endif
        for (; d < D; ++d)
          for (int64_t i = 0; i < 8; ++i) q[d * ld + r0 + i] = i < nr ? to_f(src[i][d]) * f[i] : 0.0f;
      } else {
        for (int64_t i = 0; i < nr; ++i)
          for (d = 0; d < D; ++d) q[(r0 + i) * D + d] = to_f(src[i][d]) * f[i];
      }
    }
  }

  // The item's query rows as they lie (bfloat16, unscaled) into q [round_up16(R), D], zero rows past R: the AMX
  // path's A operand.
  void load_queries_bf16(const Item& it, uint16_t* q) const {
    const int64_t D = p_.D, R = G_ * it.nq;
    const T* qbase = static_cast<const T*>(p_.q);
    for (int64_t r = 0; r < round_up16(R); ++r) {
      if (r < R)
        std::memcpy(q + r * D, qbase + it.b * p_.q_sb + row_head(it, r) * p_.q_sh + row_pos(it, r) * p_.q_sl,
                    static_cast<size_t>(D) * sizeof(uint16_t));
      else
        std::fill(q + r * D, q + (r + 1) * D, uint16_t{0});
    }
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

  // qk_norm: logit (r, c) at s[r * rs + c * cs], r < R, is divided by |k_c| = |scale_c| |krows[c]| (krows in
  // float with scales null, or as they lie).
  template <typename E>
  void normalise_keys(const TileKeys& keys, const E* const* krows, const float* scales, float* s, int64_t rs,
                      int64_t cs, int64_t R) const {
    for (int64_t c = 0; c < keys.n; ++c) {
      const float norm = std::sqrt(sum_squares(krows[c], p_.D)) * (scales ? std::fabs(scales[c]) : 1.0f);
      const float inv = 1.0f / std::max(norm, kQkNormEps);
      for (int64_t r = 0; r < R; ++r) s[r * rs + c * cs] *= inv;
    }
  }

  // Streaming path of the few-row tiles (decode): K and V rows are read from memory once per tile, key by
  // key (docs/design/cpu-attention.md), as they lie: 16-bit or float, or int8 / fp8 codes with their scales
  // folded, K's into the logits and V's into the softmax weights (after the softmax sum, which takes the
  // weights themselves); KIVI codes as tile_stream_kivi reads them. The output stays in registers
  // across the tile's value rows, so no store-to-load chain runs through o.
  void tile_stream(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    if (p_.kv_quantized && p_.kivi_bits && !p_.qk_norm)
      return p_.kivi_bits == 4 ? tile_stream_kivi<4>(it, keys, buf, pf) : tile_stream_kivi<2>(it, keys, buf, pf);
    if (p_.kv_quantized && p_.kivi_bits) {  // qk_norm: over the rows dequantized to float
      const float *krows[kBatch], *vrows[kBatch];
      float_rows(it, keys, false, buf, krows);
      float_rows(it, keys, true, buf, vrows);
      return tile_stream_rows(it, keys, buf, pf, krows, vrows, nullptr, nullptr);
    }
    if (!p_.kv_quantized) return tile_stream_stored<T>(it, keys, buf, pf);
    with_kv_format(p_.kv_format, [&](auto f) { tile_stream_stored<KvCode<decltype(f)::value>>(it, keys, buf, pf); });
  }

  // tile_stream over the K and V rows as they lie, of element type E.
  template <typename E>
  void tile_stream_stored(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    const E *krows[kBatch], *vrows[kBatch];
    float kscale[kBatch], vscale[kBatch];
    stored_rows(it, keys, false, krows, kscale);
    stored_rows(it, keys, true, vrows, vscale);
    const bool scaled = p_.kv_quantized;
    tile_stream_rows(it, keys, buf, pf, krows, vrows, scaled ? kscale : nullptr, scaled ? vscale : nullptr);
  }

  // Sets buf.q_i16: 16-bit queries (rounded to int16 at 2^-15 of their row's largest |q|, far below their own
  // precision) over int8 codes take the integer logits on AVX2 and AVX-512 in the streaming path (not careful);
  // float32 queries keep the float path, exact to float32 accumulation.
  void round_queries(int64_t R, bool gemm, Buffers& buf) const {
    buf.q_i16 = false;
#if FASTAR_ISA_LEVEL >= 1
    if (std::is_same_v<T, float> || gemm || !p_.kv_quantized || p_.kivi_bits || p_.qk_norm ||
        p_.kv_format != KvFormat::kInt8)
      return;
    buf.q_i16 = round_queries_i16(buf.q, R, p_.D, reinterpret_cast<int16_t*>(buf.qs), buf.qz);
#endif
  }

  // tile_stream over K and V rows krows, vrows with their scales (null: 1).
  template <typename E>
  void tile_stream_rows(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf, const E* const* krows,
                        const E* const* vrows, const float* kscale, const float* vscale) {
    const int64_t D = p_.D, R = G_ * it.nq, nk = keys.n;
    auto step = [&] { pf.step(); };
#if FASTAR_ISA_LEVEL >= 1
    if constexpr (std::is_same_v<E, KvCode<KvFormat::kInt8>> && !std::is_same_v<T, float>) {
      if (buf.q_i16 && !buf.careful) {
        dot_keys(QueryI16{reinterpret_cast<const int16_t*>(buf.qs), buf.qz}, R, krows, nk, D, kscale, buf.s, kBatch,
                 step);
        return stream_values(it, keys, buf, vrows, vscale);
      }
    }
#endif
    dot_keys(buf.q, R, krows, nk, D, kscale, buf.s, kBatch, step);
    if (p_.qk_norm) normalise_keys(keys, krows, kscale, buf.s, kBatch, 1, R);
    stream_values(it, keys, buf, vrows, vscale);
  }

  // tile_stream over a KIVI cache (without qk_norm) on its codes: a quantized key's logit is qs . codes + qz, its
  // group's scales and zeros folded into the queries (fold_key_scales, once per group); a quantized value row is
  // dequantized in registers (KiviValueRow); rows at or past the split are read from the window as they lie. The
  // logits are computed by runs of keys in one key group (or in the window), dot_keys's 16 at a time; a row's slot
  // is stepped from the previous key's, a division only where the rows do not follow each other.
  template <int kBits>
  void tile_stream_kivi(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    const int64_t D = p_.D, R = G_ * it.nq, nk = keys.n, G = p_.kivi_group, bytes = D * kBits / 8;
    const int64_t k_split = p_.kivi_split[2 * it.b], v_split = p_.kivi_split[2 * it.b + 1];
    const int64_t slot_bytes = bytes * p_.Hkv, groups = D / G, ld = padded_ld(D);
    int per_shift = -1;  // KiviValueRow's
    if (G % kW == 0 && (G & (G - 1)) == 0) per_shift = __builtin_ctzll(static_cast<uint64_t>(G));
    const auto* k_codes = static_cast<const uint8_t*>(p_.k);
    const auto* v_codes = static_cast<const uint8_t*>(p_.v);
    // The slot of the row at `at` (codes [slots, Hkv, bytes]), given the last one's.
    auto slot_of = [&](int64_t at, int64_t& last_at, int64_t& slot) {
      slot = at == last_at + slot_bytes ? slot + 1 : at / slot_bytes;
      last_at = at;
      return slot;
    };
    int64_t last_at = -1, slot = 0;
    // Whether slot is outside the key group folded into buf.qs (which starts at slot buf.k_group, -1: none).
    auto new_group = [&] { return buf.k_group < 0 || slot < buf.k_group || slot - buf.k_group >= G; };
    KiviCodes<kBits> krows[kBatch];
    const T* wrows[kBatch];
    auto step = [&] { pf.step(); };
    for (int64_t c0 = 0; c0 < nk;) {
      int64_t c1 = c0;
      if (keys.at(c0) >= k_split) {
        for (; c1 < nk && keys.at(c1) >= k_split; ++c1) wrows[c1 - c0] = window_row(it, false, keys.at(c1));
        dot_keys(buf.q, R, wrows, c1 - c0, D, nullptr, buf.s + c0, kBatch, step);
        c0 = c1;
        continue;
      }
      const int64_t at0 = row_offset(it, false, keys.at(c0));
      slot_of(at0, last_at, slot);
      if (new_group()) {
        buf.k_group = slot / G * G;
        const int64_t group = (slot / G * p_.Hkv + it.hkv) * D;  // as kivi_row_to_float's
        const auto* scale = reinterpret_cast<const c10::Half*>(p_.kivi_k_scale + group);
        const auto* zero = reinterpret_cast<const c10::Half*>(p_.kivi_k_zero + group);
        for (int64_t r = 0; r < R; ++r) buf.qz[r] = fold_key_scales(buf.q + r * D, scale, zero, buf.qs + r * D, D);
      }
      krows[0] = {k_codes + at0};
      for (c1 = c0 + 1; c1 < nk && keys.at(c1) < k_split; ++c1) {
        const int64_t at = row_offset(it, false, keys.at(c1)), prev_slot = slot;
        slot_of(at, last_at, slot);
        if (new_group()) {  // the next run's: its group is folded then
          last_at = -1, slot = prev_slot;
          break;
        }
        krows[c1 - c0] = {k_codes + at};
      }
      dot_keys(buf.qs, R, krows, c1 - c0, D, nullptr, buf.s + c0, kBatch, step);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = c0; c < c1; ++c) buf.s[r * kBatch + c] += buf.qz[r];
      c0 = c1;
    }
    // A quantized value row's scales and zeros in float: buf.vf's row c, [0, groups) and [groups, 2 groups).
    KiviValueRow<kBits, T> vrows[kBatch];
    last_at = -1;
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t s = keys.at(c);
      if (s >= v_split) {
        vrows[c] = {nullptr, nullptr, nullptr, G, per_shift, window_row(it, true, s)};
      } else {
        const int64_t at = row_offset(it, true, s), meta = (slot_of(at, last_at, slot) * p_.Hkv + it.hkv) * groups;
        float* sz = buf.vf + c * ld;
        for (int64_t g = 0; g < groups; ++g) sz[g] = half_bits_to_float(p_.kivi_v_scale[meta + g]);
        for (int64_t g = 0; g < groups; ++g) sz[groups + g] = half_bits_to_float(p_.kivi_v_zero[meta + g]);
        vrows[c] = {v_codes + at, sz, sz + groups, G, per_shift, nullptr};
      }
    }
    stream_values(it, keys, buf, vrows, static_cast<const float*>(nullptr));
  }

  // The decode path after the logits buf.s: mask, online softmax, o += P V over the rows vrows (of a row type of
  // cpu/kernels/microkernels.h) with their scales (null: 1).
  template <typename V>
  void stream_values(const Item& it, const TileKeys& keys, Buffers& buf, const V* vrows, const float* vscale) {
    const int64_t D = p_.D, R = G_ * it.nq, nk = keys.n;
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
      if (vscale) scale_row(srow, vscale, nk);
    }
    if (buf.careful && keys.vis) {
      masked_values(keys, 0, R, [&](int64_t r, int64_t c) { return buf.s[r * kBatch + c]; }, vrows, buf, false);
      return;
    }
    axpy_row(buf.o, R, D, buf.s, kBatch, vrows, nk);
  }

  // o[r] (* corr[r] when rescale) += sum over the keys row r sees of p(r, c) * v_c, for rows [r0, r0 + nr).
  // Row r is query position (r - r0) % np of the keys' positions (every head of a GQA group shares them).
  template <typename P, typename V>
  void masked_values(const TileKeys& keys, int64_t r0, int64_t nr, P&& p, const V* vrows, Buffers& buf,
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
        for (int64_t d = 0; d < D; ++d) o[d] += w * value_at(vrows[c], d);
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
            row_to_float(it, false, r, hc->k.data() + r * ld);
            row_to_float(it, true, r, hc->v.data() + r * ld);
          }
          hc->ready[static_cast<size_t>(t)] = 1;
        }
        rows[c] = (value ? hc->v : hc->k).data() + j * ld;
      }
      return;
    }
    const bool in_place = std::is_same_v<T, float> && !p_.kv_quantized && !(value && sl * 4 % 512 == 0);
    if (in_place && !p_.block_table) {  // the common case, without a page lookup per row
      const float* head = reinterpret_cast<const float*>(base + it.b * sb + it.hkv * sh);
      for (int64_t c = 0; c < keys.n; ++c) rows[c] = head + keys.at(c) * sl;
      return;
    }
    float* dst = value ? buf.vf : buf.kf;
    for (int64_t c = 0; c < keys.n; ++c) {
      if (in_place) {
        rows[c] = reinterpret_cast<const float*>(stored_row<T>(it, value, keys.at(c)));
      } else {
        row_to_float(it, value, keys.at(c), dst + c * ld);
        rows[c] = dst + c * ld;
      }
    }
  }

  // Where key s's K (or V) row of the item's head lies in k (or v), in elements; and its scale in k_scale
  // (v_scale).
  int64_t row_offset(const Item& it, bool value, int64_t s) const {
    return value ? offset_of(it, p_.v_sb, p_.v_sh, p_.v_sl, s) : offset_of(it, p_.k_sb, p_.k_sh, p_.k_sl, s);
  }
  int64_t scale_offset(const Item& it, bool value, int64_t s) const {
    return value ? offset_of(it, p_.vs_sb, p_.vs_sh, p_.vs_sl, s) : offset_of(it, p_.ks_sb, p_.ks_sh, p_.ks_sl, s);
  }
  // kv_row_offset, with its unpaged case inline (it runs per key and head on the decode path).
  int64_t offset_of(const Item& it, int64_t sb, int64_t sh, int64_t sl, int64_t s) const {
    if (!p_.block_table) return it.b * sb + it.hkv * sh + s * sl;
    return kv_row_offset(p_, sb, sh, sl, it.b, it.hkv, s);
  }

  // Key s's K (or V) row as it lies, as elements of type E.
  template <typename E>
  const E* stored_row(const Item& it, bool value, int64_t s) const {
    return static_cast<const E*>(value ? p_.v : p_.k) + row_offset(it, value, s);
  }

  // The scale of key s's K (or V) row: its codes times it are its values (1 for an unquantized cache; not KIVI).
  float row_scale(const Item& it, bool value, int64_t s) const {
    if (!p_.kv_quantized) return 1.0f;
    return (value ? p_.v_scale : p_.k_scale)[scale_offset(it, value, s)];
  }

  // The keys' K (or V) rows as they lie, and their scales.
  template <typename E>
  void stored_rows(const Item& it, const TileKeys& keys, bool value, const E** rows, float* scales) const {
    if (!p_.block_table) {  // a multiply-add per key (this runs per key and head on the decode path)
      const E* head = stored_row<E>(it, value, 0);
      const int64_t sl = value ? p_.v_sl : p_.k_sl;
      for (int64_t c = 0; c < keys.n; ++c) rows[c] = head + keys.at(c) * sl;
      if (!p_.kv_quantized) return std::fill(scales, scales + keys.n, 1.0f);
      const float* scale = (value ? p_.v_scale : p_.k_scale) + scale_offset(it, value, 0);
      const int64_t ssl = value ? p_.vs_sl : p_.ks_sl;
      for (int64_t c = 0; c < keys.n; ++c) scales[c] = scale[keys.at(c) * ssl];
      return;
    }
    for (int64_t c = 0; c < keys.n; ++c) {
      rows[c] = stored_row<E>(it, value, keys.at(c));
      scales[c] = row_scale(it, value, keys.at(c));
    }
  }

  // Key s's K (or V) row of the item's head in float: converted from 16 bits, or dequantized (codes * scale; KIVI:
  // codes * scale + zero, or the window's row).
  void row_to_float(const Item& it, bool value, int64_t s, float* dst) const {
    if (p_.kv_quantized && p_.kivi_bits) return kivi_row_to_float(it, value, s, row_offset(it, value, s), dst);
    const float scale = row_scale(it, value, s);
    if (!p_.kv_quantized) return to_float_row(stored_row<T>(it, value, s), scale, dst, p_.D);
    with_kv_format(p_.kv_format, [&](auto f) {
      to_float_row(stored_row<KvCode<decltype(f)::value>>(it, value, s), scale, dst, p_.D);
    });
  }

  void kivi_row(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, int64_t per, float* dst) const {
    if (p_.kivi_bits == 4) return kivi_dequantize_row<4>(codes, scale, zero, per, dst, p_.D);
    kivi_dequantize_row<2>(codes, scale, zero, per, dst, p_.D);
  }

  // Key s's K (or V) row of the item's head in KIVI's full-precision window (s at or past the split).
  const T* window_row(const Item& it, bool value, int64_t s) const {
    const T* window = static_cast<const T*>(value ? p_.kivi_v_window : p_.kivi_k_window);
    return window + ((it.b * p_.kivi_window_len + s % p_.kivi_window_len) * p_.Hkv + it.hkv) * p_.D;
  }

  // row_to_float for a KIVI cache; at: the row's offset in the codes (core/attention.h).
  void kivi_row_to_float(const Item& it, bool value, int64_t s, int64_t at, float* dst) const {
    const int64_t D = p_.D, G = p_.kivi_group;
    if (s >= p_.kivi_split[2 * it.b + value]) return to_float_row(window_row(it, value, s), 1.0f, dst, D);
    const int64_t bytes = D * p_.kivi_bits / 8, slot_head = at / bytes;  // slot * Hkv + head
    const uint8_t* codes = static_cast<const uint8_t*>(value ? p_.v : p_.k) + at;
    if (value) {  // per token, over groups of G channels
      const int64_t meta = slot_head * (D / G);
      kivi_row(codes, p_.kivi_v_scale + meta, p_.kivi_v_zero + meta, G, dst);
    } else {  // per channel, over the group of G tokens holding slot
      const int64_t meta = (slot_head / p_.Hkv / G * p_.Hkv + it.hkv) * D;
      kivi_row(codes, p_.kivi_k_scale + meta, p_.kivi_k_zero + meta, 1, dst);
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
    if (p_.qk_norm) normalise_keys(keys, krows, static_cast<const float*>(nullptr), buf.s + r0, 1, ld, cols);
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
        mx = column_max(buf.s + r, ld, nk, mx);
      }
      // The column's rows' states, one row per lane (buf.state keeps them row by row).
      float m[kW], l[kW];
      for (int i = 0; i < kW; ++i) m[i] = buf.state[r + i].m, l[i] = buf.state[r + i].l;
      SoftmaxState<Vec> st{Vec::load(m), Vec::load(l)};
      st.update(mx).store(buf.corr + r);
      const Vec shift = st.shift();
      Vec sum = Vec::zero();
      for (int64_t c = 0; c < nk; ++c) {
        const Vec e = exp(Vec::load(buf.s + c * ld + r) - shift);
        e.store(buf.s + c * ld + r);
        sum = sum + e;
      }
      st.add(sum);
      st.m.store(m);
      st.l.store(l);
      for (int i = 0; i < kW; ++i) buf.state[r + i] = RowState{m[i], l[i]};
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

#if FASTAR_ISA_LEVEL >= 2
  // tile_gemm on AMX tiles (amx_applies), by rows: S = Q K^T over the codes in bfloat16 into s [rows, kBatch],
  // times the softmax scale and the keys' scales, masked; each row's online softmax; P times the values' scales
  // in bfloat16 over s's rows; o = o * corr + P V over the value codes in bfloat16. Keys are padded to a multiple
  // of 32 with zero rows, the step's rows to a multiple of 16 with zero P (in o, rows past R or other positions').
  // Scratch: the bfloat16 K (then V) rows in vf, K^T's and V's row pairs in kf.
  void tile_amx(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    with_kv_format(p_.kv_format, [&](auto f) { tile_amx_codes<KvCode<decltype(f)::value>>(it, keys, buf, pf); });
  }

  template <typename E>
  FASTAR_AMX_TARGET void tile_amx_codes(const Item& it, const TileKeys& keys, Buffers& buf, RowPrefetch& pf) {
    const int64_t D = p_.D, nk = keys.n, nkp = round_up(nk, 32);
    const int64_t r0 = G_ == 1 ? keys.p0 : 0, nr = G_ == 1 ? keys.np : G_ * it.nq, rows = round_up16(nr);
    auto* bf_rows = reinterpret_cast<uint16_t*>(buf.vf);  // [nkp, D]
    float* row = buf.vf + kBatch * D / 2;                 // [D]
    auto* k_pairs = reinterpret_cast<uint32_t*>(buf.kf);  // [D / 2, nkp]
    uint32_t* v_pairs = k_pairs + kBatch * D / 2;         // [nkp / 2, D]
    auto* p_rows = reinterpret_cast<uint16_t*>(buf.s);    // P's rows over s's, 2 * kBatch bf16 apart
    float kscale[kBatch], vscale[kBatch];
    auto to_bf16_rows = [&](bool value) {
      for (int64_t c = 0; c < nkp; ++c) {
        if (c < nk) {
          to_float_row(stored_row<E>(it, value, keys.at(c)), 1.0f, row, D);
          to_bf16_row(row, nullptr, D, D, bf_rows + c * D);
        } else {
          std::fill(bf_rows + c * D, bf_rows + (c + 1) * D, uint16_t{0});
        }
      }
    };
    for (int64_t c = 0; c < nk; ++c) {
      kscale[c] = p_.scale * row_scale(it, false, keys.at(c));
      vscale[c] = row_scale(it, true, keys.at(c));
    }
    to_bf16_rows(false);
    transpose_row_pairs(bf_rows, D, nkp, D, k_pairs);
    amx_gemm<false>(rows, nkp, D, reinterpret_cast<const uint16_t*>(buf.q) + r0 * D, D, k_pairs, nkp,
                    buf.s + r0 * kBatch, kBatch);
    if (keys.vis) {  // the mask after the scales: a hidden key's (even NaN) logit becomes -inf
      for (int64_t r = r0; r < r0 + nr; ++r) scale_row(buf.s + r * kBatch, kscale, nk);
      apply_mask(it, keys, buf.s, kBatch, 1);
    }
    const float* s_scale = keys.vis ? nullptr : kscale;  // the logits' scales where not yet applied
    for (int64_t r = r0; r < r0 + rows; ++r) {
      float* x = buf.s + r * kBatch;
      if (r >= r0 + nr) {
        std::fill(p_rows + 2 * r * kBatch, p_rows + 2 * r * kBatch + nkp, uint16_t{0});
        continue;
      }
      RowState& st = buf.state[r];
      const float corr = st.update(scaled_max(x, s_scale, nk, kNegInf));
      st.add(exp_to_bf16_row(x, s_scale, st.shift(), vscale, nk, nkp, p_rows + 2 * r * kBatch));
      pf.step();
      if (corr != 1.0f) {
        for (int64_t d = 0; d < D; ++d) buf.o[r * D + d] *= corr;
      }
    }
    to_bf16_rows(true);
    interleave_row_pairs(bf_rows, D, nkp, D, v_pairs);
    amx_gemm<true>(rows, D, nkp, p_rows + 2 * r0 * kBatch, 2 * kBatch, v_pairs, D, buf.o + r0 * D, D);
    pf.finish();
  }
#endif

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
  const AttentionPlan plan_;
  const int64_t G_, q_tile_, n_q_tiles_, splits_;  // the plan's
  const int64_t kv_bytes_;                         // bytes per K/V element as stored
  const bool amx_;                                 // the GEMM path runs on AMX tiles (amx_applies)
  std::vector<float> partial_o_;
  std::vector<RowState> partial_state_;  // [items, splits_, rows] each split's row states, to merge
};

}  // namespace

void attention(const AttentionParams& p, FloatKind kind) {
  with_element_type(kind, [&](auto t) { AttentionCpu<decltype(t)>(p).run(); });
}

FASTAR_ISA_END
