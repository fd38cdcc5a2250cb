// Decode CUDA kernel of fastar's masked attention: items of at most kDecodeRows query rows (a decode step, GQA
// heads x a few positions), memory-bound by design.
//  * K and V rows go global -> registers in 16-byte loads, never through shared memory: a row of D elements is
//    read by kLanes lanes (one or more 16-byte vectors each), so a warp covers 32 / kLanes keys at a time and
//    the block (4 warps) kKeysPerStep. Each thread issues kUnroll keys' K and V loads before it uses any.
//  * Paged caches: the block table is read once per page of a step, into shared memory.
//  * The q rows, scaled, sit in registers in the same vector layout; a logit is a kLanes-wide shuffle sum.
//  * Every lane group (a key slot) runs its own online softmax per row (core/softmax.h's state, log2 units);
//    at the end the groups' states are merged through shared memory into the output (or the split's state).
// Bytes in flight: 128 threads x kDecodeUnroll (2) x 2 x 16 bytes = 8 KB per block. Little's law on an H100
// (3.35 TB/s, ~600 ns) needs ~2 MB in flight, ~15 KB per SM: the launcher gives every SM two or more blocks
// (kv splits when the batch is small), and registers (q and o rows, ~200) allow 2 blocks per SM.
// A hidden key's V row is skipped (not multiplied by 0), so a NaN in it stays out of the row.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda/attention.cuh"

namespace fastar::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeRowsMax = 8;
constexpr int kDecodeUnroll = 2;

FASTAR_HD constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <typename T, int kD>
struct DecodeShape {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));          // elements per 16-byte load
  static constexpr int kVecs = (kD + kVec - 1) / kVec;                   // 16-byte vectors per row
  static constexpr int kLanes = pow2_at_least(kVecs < 32 ? kVecs : 32);  // lanes per key row
  static constexpr int kPerLane = (kVecs + kLanes - 1) / kLanes;         // vectors per lane
  static constexpr int kElems = kPerLane * kVec;                         // elements per lane
  static constexpr int kGroups = kDecodeThreads / kLanes;                // key slots per block
  static constexpr int kKeysPerStep = kGroups * kDecodeUnroll;
  // Shared memory: every key slot's state per row (m, l, o[kD]) for the final merge.
  static constexpr int64_t kBytes = int64_t{kGroups} * kDecodeRowsMax * (kD + 2) * 4;
  static_assert(kBytes <= 48 * 1024 && kKeysPerStep * 8 <= kBytes, "no opt-in above 48 KB; the step's pages fit");
};

// Whether the decode kernel takes these arguments: its 16-byte loads need every K and V row 16-byte aligned.
template <typename T>
FASTAR_HD bool decode_rows_aligned(const AttentionParams& p) {
  constexpr int64_t kVec = 16 / sizeof(T);
  const bool ptrs = reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  return ptrs && p.D % kVec == 0 && (p.k_sb | p.k_sh | p.k_sl | p.v_sb | p.v_sh | p.v_sl) % kVec == 0;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(AttentionParams p, AttentionWork w) {
  using S = DecodeShape<T, kD>;
  constexpr int kVec = S::kVec, kLanes = S::kLanes, kPerLane = S::kPerLane, kElems = S::kElems;
  FASTAR_DYNAMIC_SMEM(float, s_state);

  const int tid = threadIdx.x, lane = tid & 31;
  const int group = tid / kLanes, lk_lane = tid % kLanes;  // key slot, and this lane's place in the row
  const BlockItem it = block_item(p, w, 1);
  const int R = it.R;
  const MaskGeometry geom = mask_geometry(p, it.b);
  const int64_t k_begin = it.t_begin, k_end = it.t_end;  // tiles of one key

  // Element e of vector v of this lane: column (v * kLanes + lk_lane) * kVec + e.
  auto column = [&](int v, int e) { return (v * kLanes + lk_lane) * kVec + e; };
  auto sum_row = [&](float x) {
#pragma unroll
    for (int m = 1; m < kLanes; m <<= 1) x += __shfl_xor_sync(kFullMask, x, m);
    return x;
  };

  // q rows in registers as given (16-byte vectors of T, half the registers of floats; rows past R are 0), and
  // each row's factor for its logits: scale * log2(e) (qk_norm: times q_scale[h] / |q|).
  uint4 qv[kDecodeRowsMax][kPerLane];
  float rowf[kDecodeRowsMax];
#pragma unroll
  for (int r = 0; r < kDecodeRowsMax; ++r) {
    const bool live = r < R;
    const RowDest rd = it.dest(live ? r : 0);
    const T* src = static_cast<const T*>(p.q) + rd.b * p.q_sb + rd.h * p.q_sh + rd.i * p.q_sl;
    float ss = 0.0f;
#pragma unroll
    for (int v = 0; v < kPerLane; ++v) {
      T x[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int d = column(v, e);
        x[e] = live && d < kD ? src[d] : from_float<T>(0.0f);
        ss += to_float(x[e]) * to_float(x[e]);
      }
      memcpy(&qv[r][v], static_cast<const void*>(x), 16);
    }
    rowf[r] = p.scale * kLog2e;
    if (p.qk_norm) rowf[r] *= (p.q_scale ? p.q_scale[rd.h] : 1.0f) * qk_norm_factor(sum_row(ss));
  }

  RowState st[kDecodeRowsMax];
  float o[kDecodeRowsMax][kElems];
#pragma unroll
  for (int r = 0; r < kDecodeRowsMax; ++r) {
    st[r] = RowState::init();
#pragma unroll
    for (int e = 0; e < kElems; ++e) o[r][e] = 0.0f;
  }

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const T* bias = static_cast<const T*>(p.mask.bias);
  const bool masked =
      p.mask.causal || p.mask.window || p.mask.block != BlockRelation::kNone || p.mask.bits || p.mask.scale_window >= 0;

  // Paged caches: the pages of a step's keys, read from the block table once per page into shared memory
  // (the merge area, unused until the end; -1: a page out of range, whose keys read as absent).
  int64_t* s_pages = reinterpret_cast<int64_t*>(s_state);
  for (int64_t j0 = k_begin; j0 < k_end; j0 += S::kKeysPerStep) {
    int64_t first_page = 0;
    if (p.block_table) {  // block-uniform
      first_page = page_pos(p, j0).column;
      const int64_t pages = page_pos(p, min64(j0 + S::kKeysPerStep, k_end) - 1).column - first_page + 1;
      __syncthreads();  // the previous step's pages have been read
      if (tid < pages) {
        const int64_t page = p.block_table[it.b * p.bt_sb + first_page + tid];
        s_pages[tid] = page >= 0 && page < p.num_pages ? page : -1;
      }
      __syncthreads();
    }
    // Issue every load of the step first: kDecodeUnroll keys' K and V vectors (absent keys read as 0).
    uint4 kraw[kDecodeUnroll][kPerLane], vraw[kDecodeUnroll][kPerLane];
    bool ok[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int64_t j = j0 + u * S::kGroups + group;
      ok[u] = j < k_end;
      const T* krow = kbase;
      const T* vrow = vbase;
      if (ok[u] && p.block_table) {
        const PagePos pp = page_pos(p, j);
        const int64_t page = s_pages[pp.column - first_page];
        ok[u] = page >= 0;
        krow += page * p.k_sb + it.hkv * p.k_sh + pp.row * p.k_sl;
        vrow += page * p.v_sb + it.hkv * p.v_sh + pp.row * p.v_sl;
      } else if (ok[u]) {
        krow += kv_row_offset(p, p.k_sb, p.k_sh, p.k_sl, it.b, it.hkv, j);
        vrow += kv_row_offset(p, p.v_sb, p.v_sh, p.v_sl, it.b, it.hkv, j);
      }
#pragma unroll
      for (int x = 0; x < kPerLane; ++x) {
        const int d0 = column(x, 0);
        const bool in = ok[u] && d0 < kD;
        kraw[u][x] = in ? *reinterpret_cast<const uint4*>(krow + d0) : make_uint4(0, 0, 0, 0);
        vraw[u][x] = in ? *reinterpret_cast<const uint4*>(vrow + d0) : make_uint4(0, 0, 0, 0);
      }
    }
    float kf[kDecodeUnroll];  // qk_norm: 1 / |k row|
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      kf[u] = 1.0f;
      if (p.qk_norm) {
        float ss = 0.0f;
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float kx = vector_element<T>(kraw[u][x], e);
            ss += kx * kx;
          }
        }
        kf[u] = qk_norm_factor(sum_row(ss));
      }
    }
    // Bit r of hid[u]: key u hidden from row r (absent, or masked). A rolled loop: one copy of the mask code.
    uint32_t hid[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) hid[u] = ok[u] ? 0u : ~0u;
    if (masked) {
#pragma unroll 1
      for (int r = 0; r < R; ++r) {
        const int64_t i = it.dest(r).i;
#pragma unroll
        for (int u = 0; u < kDecodeUnroll; ++u) {
          if (ok[u] && !mask_visible(p.mask, it.b, i, j0 + u * S::kGroups + group, geom)) hid[u] |= 1u << r;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kDecodeRowsMax; ++r) {
      if (r >= R) break;  // block-uniform
      float s[kDecodeUnroll];
      bool hidden[kDecodeUnroll];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            dot = fmaf(vector_element<T>(qv[r][x], e), vector_element<T>(kraw[u][x], e), dot);
        }
        s[u] = sum_row(dot) * rowf[r] * kf[u];
        const int64_t j = j0 + u * S::kGroups + group;
        hidden[u] = hid[u] >> r & 1;
        if (!hidden[u] && bias) {
          const RowDest rd = it.dest(r);
          s[u] += to_float(bias[rd.b * p.mask.bias_sb + rd.h * p.mask.bias_sh + rd.i * p.mask.bias_sq + j]) * kLog2e;
        }
        if (hidden[u]) s[u] = -INFINITY;  // replaced: a hidden key's NaN logit stays out of the row
        mx = softmax_max(mx, s[u]);
      }
      if (mx == -INFINITY) continue;  // this slot saw no key of the row in this step (slot-uniform)
      const float corr = st[r].update(mx);
#pragma unroll
      for (int e = 0; e < kElems; ++e) o[r][e] *= corr;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        if (hidden[u]) continue;  // its V row (even NaN) stays out of the row
        const float pr = st[r].prob(s[u]);
        st[r].add(pr);
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            float& acc = o[r][x * kVec + e];
            acc = fmaf(pr, vector_element<T>(vraw[u][x], e), acc);
          }
        }
      }
    }
  }

  // Every key slot's states into shared memory, then one warp per row merges them (merge_and_store).
  __syncthreads();  // the last step's pages have been read
#pragma unroll
  for (int r = 0; r < kDecodeRowsMax; ++r) {
    if (r >= R) break;
    float* dst = s_state + (group * kDecodeRowsMax + r) * (kD + 2);
    if (lk_lane == 0) {
      dst[0] = st[r].m;
      dst[1] = st[r].l;
    }
#pragma unroll
    for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int d = column(x, e);
        if (d < kD) dst[2 + d] = o[r][x * kVec + e];
      }
    }
  }
  __syncthreads();
  const int warp = tid >> 5;
  for (int r = warp; r < R; r += kDecodeThreads / 32) {
    const float* src = s_state + r * (kD + 2);
    constexpr int64_t kSlotStride = int64_t{kDecodeRowsMax} * (kD + 2);
    merge_and_store<T>(
        p, w, it.split, it.dest(r), S::kGroups, lane,
        [&](int64_t g) { return RowState{src[g * kSlotStride], src[g * kSlotStride + 1]}; },
        [&](int64_t g, int64_t d) { return src[g * kSlotStride + 2 + d]; });
  }
}

// Launches attention_decode_kernel<T, D> for the planned work (attention_decode.cu). D: a tc_head_dim, at
// most 128 for fp32.
void launch_attention_decode(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                             cudaStream_t stream);

}  // namespace fastar::cuda
