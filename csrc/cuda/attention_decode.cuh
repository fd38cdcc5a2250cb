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
// Quantized K/V (KV = KvCode<F>, one instance per format): a 16-byte load carries 16 codes, so D / 16 lanes share
// a row and a warp covers twice the keys of bf16. Each step converts its codes to float once, in registers
// (cuda/kv_codes.cuh). The scales are folded, one float load per key with its rows: K's multiplies the logit
// (the dot product runs on the codes), V's multiplies p before P.V while the row sum l takes p unscaled. With 16
// output columns per lane, the q rows move to shared memory (float, lanes interleaved: conflict-free 16-byte
// reads) to leave the registers to the accumulators.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/kv_codes.cuh"

namespace fastar::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeRowsMax = 8;
constexpr int kDecodeUnroll = 2;

FASTAR_HD constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

// KV: the K/V element type (T, or KvCode<F> for one-byte codes).
template <typename KV, int kD>
struct DecodeShape {
  static constexpr bool kCodes = kIsKvCode<KV>;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(KV));         // elements per 16-byte load
  static constexpr int kVecs = (kD + kVec - 1) / kVec;                   // 16-byte vectors per row
  static constexpr int kLanes = pow2_at_least(kVecs < 32 ? kVecs : 32);  // lanes per key row
  static constexpr int kPerLane = (kVecs + kLanes - 1) / kLanes;         // vectors per lane
  static constexpr int kElems = kPerLane * kVec;                         // elements per lane
  static constexpr int kGroups = kDecodeThreads / kLanes;                // key slots per block
  // Keys per slot and step. Codes: 1, so that 16 output columns per lane fit in the 255 registers without a
  // spill; 4 KB in flight per block, half of bf16's.
  static constexpr int kUnroll = kCodes ? 1 : kDecodeUnroll;
  static constexpr int kKeysPerStep = kGroups * kUnroll;
  // Shared memory: every key slot's state per row (m, l, o[kD]) for the final merge; then (codes) the q rows,
  // element (r, x, e) of lane l at ((r * kPerLane + x) * kVec / 4 + e / 4) * 4 * kLanes + 4 * l + e % 4.
  static constexpr int64_t kMergeBytes = int64_t{kGroups} * kDecodeRowsMax * (kD + 2) * 4;
  static constexpr int64_t kBytes = kMergeBytes + (kCodes ? int64_t{kDecodeRowsMax} * kLanes * kElems * 4 : 0);
  // Codes: 66 to 74 KB, past the 48 KB default (allow_dynamic_smem opts in); 2 blocks per SM fit on sm_80.
  static_assert(kBytes <= (kCodes ? 80 : 48) * 1024 && kKeysPerStep * 8 <= kMergeBytes, "the step's pages fit");
};

// Whether the decode kernel takes these arguments: its 16-byte loads need every K and V row 16-byte aligned. E:
// the K/V element (uint8_t for codes).
template <typename E>
FASTAR_HD bool decode_rows_aligned(const AttentionParams& p) {
  constexpr int64_t kVec = 16 / sizeof(E);
  const bool ptrs = reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  return ptrs && p.D % kVec == 0 && (p.k_sb | p.k_sh | p.k_sl | p.v_sb | p.v_sh | p.v_sl) % kVec == 0;
}

template <typename T, int kD, typename KV = T>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(AttentionParams p, AttentionWork w) {
  using S = DecodeShape<KV, kD>;
  constexpr bool kCodes = S::kCodes;
  using E = std::conditional_t<kCodes, uint8_t, T>;  // what a K/V row holds
  constexpr int kVec = S::kVec, kLanes = S::kLanes, kPerLane = S::kPerLane, kElems = S::kElems, kUnroll = S::kUnroll;
  FASTAR_DYNAMIC_SMEM(float, s_state);
  float* s_q = s_state + S::kMergeBytes / 4;  // codes: the q rows

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

  auto q_index = [&](int r, int x, int e) {
    return ((r * kPerLane + x) * (kVec / 4) + e / 4) * 4 * kLanes + 4 * lk_lane + e % 4;
  };
  // q rows as given (rows past R are 0): in registers as 16-byte vectors of T (half the registers of floats), or
  // (codes) as float in shared memory, written by key slot 0. Each row's factor for its logits: scale * log2(e)
  // (qk_norm: times q_scale[h] / |q|).
  uint4 qv[kCodes ? 1 : kDecodeRowsMax][kPerLane];
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
      if constexpr (kCodes) {
        if (group == 0) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) s_q[q_index(r, v, e)] = to_float(x[e]);
        }
      } else {
        memcpy(&qv[r][v], static_cast<const void*>(x), 16);
      }
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

  if constexpr (kCodes) __syncthreads();  // the q rows are in shared memory
  auto q_at = [&](int r, int x, int e) {
    if constexpr (kCodes) {
      return s_q[q_index(r, x, e)];
    } else {
      return vector_element<T>(qv[r][x], e);
    }
  };

  const E* kbase = static_cast<const E*>(p.k);
  const E* vbase = static_cast<const E*>(p.v);
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
    // Issue every load of the step first: kUnroll keys' K and V vectors (absent keys read as 0).
    // Codes: each key's scales (ks, vs), loaded with its rows.
    uint4 kraw[kUnroll][kPerLane], vraw[kUnroll][kPerLane];
    bool ok[kUnroll];
    float ks[kUnroll], vs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * S::kGroups + group;
      ok[u] = j < k_end;
      const E* krow = kbase;
      const E* vrow = vbase;
      ks[u] = vs[u] = 0.0f;
      if (ok[u] && p.block_table) {
        const PagePos pp = page_pos(p, j);
        const int64_t page = s_pages[pp.column - first_page];
        ok[u] = page >= 0;
        krow += page * p.k_sb + it.hkv * p.k_sh + pp.row * p.k_sl;
        vrow += page * p.v_sb + it.hkv * p.v_sh + pp.row * p.v_sl;
        if constexpr (kCodes) {
          if (ok[u]) {
            ks[u] = p.k_scale[page * p.ks_sb + it.hkv * p.ks_sh + pp.row * p.ks_sl];
            vs[u] = p.v_scale[page * p.vs_sb + it.hkv * p.vs_sh + pp.row * p.vs_sl];
          }
        }
      } else if (ok[u]) {
        krow += kv_row_offset(p, p.k_sb, p.k_sh, p.k_sl, it.b, it.hkv, j);
        vrow += kv_row_offset(p, p.v_sb, p.v_sh, p.v_sl, it.b, it.hkv, j);
        if constexpr (kCodes) {
          ks[u] = p.k_scale[kv_row_offset(p, p.ks_sb, p.ks_sh, p.ks_sl, it.b, it.hkv, j)];
          vs[u] = p.v_scale[kv_row_offset(p, p.vs_sb, p.vs_sh, p.vs_sl, it.b, it.hkv, j)];
        }
      }
#pragma unroll
      for (int x = 0; x < kPerLane; ++x) {
        const int d0 = column(x, 0);
        const bool in = ok[u] && d0 < kD;
        kraw[u][x] = in ? *reinterpret_cast<const uint4*>(krow + d0) : make_uint4(0, 0, 0, 0);
        vraw[u][x] = in ? *reinterpret_cast<const uint4*>(vrow + d0) : make_uint4(0, 0, 0, 0);
      }
    }
    // The step's K elements as float: the raw vectors' (T), or the codes converted once (codes).
    float kc[kCodes ? kUnroll : 1][kElems];
    if constexpr (kCodes) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) codes_to_float<KV::kFormat>(kraw[u][x], &kc[u][x * kVec]);
      }
    }
    auto k_at = [&](int u, int x, int e) {
      if constexpr (kCodes) {
        return kc[u][x * kVec + e];
      } else {
        return vector_element<T>(kraw[u][x], e);
      }
    };
    float kf[kUnroll];  // the logit's factor for the key: qk_norm's 1 / |k row|, times K's scale (codes)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      kf[u] = 1.0f;
      if (p.qk_norm) {
        float ss = 0.0f;
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) ss += k_at(u, x, e) * k_at(u, x, e);
        }
        kf[u] = qk_norm_factor(kCodes ? sum_row(ss) * ks[u] * ks[u] : sum_row(ss));
      }
      if constexpr (kCodes) kf[u] *= ks[u];
    }
    // Bit r of hid[u]: key u hidden from row r (absent, or masked). A rolled loop: one copy of the mask code.
    uint32_t hid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) hid[u] = ok[u] ? 0u : ~0u;
    if (masked) {
#pragma unroll 1
      for (int r = 0; r < R; ++r) {
        const int64_t i = it.dest(r).i;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (ok[u] && !mask_visible(p.mask, it.b, i, j0 + u * S::kGroups + group, geom)) hid[u] |= 1u << r;
        }
      }
    }
    float vc[kCodes ? kUnroll : 1][kElems];  // the step's V codes as float (codes)
    if constexpr (kCodes) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) codes_to_float<KV::kFormat>(vraw[u][x], &vc[u][x * kVec]);
      }
    }
    auto v_at = [&](int u, int x, int e) {
      if constexpr (kCodes) {
        return vc[u][x * kVec + e];
      } else {
        return vector_element<T>(vraw[u][x], e);
      }
    };
#pragma unroll
    for (int r = 0; r < kDecodeRowsMax; ++r) {
      if (r >= R) break;  // block-uniform
      float s[kUnroll];
      bool hidden[kUnroll];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot = fmaf(q_at(r, x, e), k_at(u, x, e), dot);
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
      for (int u = 0; u < kUnroll; ++u) {
        if (hidden[u]) continue;  // its V row (even NaN) stays out of the row
        const float pr = st[r].prob(s[u]);
        st[r].add(pr);
        const float pv = kCodes ? pr * vs[u] : pr;  // V's scale folded into p
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            float& acc = o[r][x * kVec + e];
            acc = fmaf(pv, v_at(u, x, e), acc);
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

// Launches attention_decode_kernel<T, D, KV> for the planned work. D: a tc_head_dim, at most 128 for fp32 over a
// cache of T; KV: T (attention_decode.cu) or KvCode<F> (attention_decode_quantized.cu, any T and D).
template <typename KV>
void launch_decode_instance(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                            cudaStream_t stream) {
  dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    using K = std::conditional_t<kIsKvCode<KV>, KV, T>;
    with_head_dim(p.D, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if constexpr (kIsKvCode<K> || !std::is_same_v<T, float> || kD <= 128) {  // the planner keeps fp32 D = 256 off
        auto* kernel = &attention_decode_kernel<T, kD, K>;
        constexpr int64_t kSmem = DecodeShape<K, kD>::kBytes;
        allow_dynamic_smem(kernel, kSmem);
        launch_kernel("attention_vec_decode", kernel, grid, dim3(kDecodeThreads), static_cast<size_t>(kSmem), stream, p,
                      w);
      }
    });
  });
}

void launch_attention_decode(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                             cudaStream_t stream);
void launch_attention_decode_quantized(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                       cudaStream_t stream);
// KIVI int4 / int2 caches (attention_decode_kivi.cuh), for the calls the planner's kivi_decode_supported admits.
void launch_attention_decode_kivi(const AttentionParams& p, FloatKind kind, const AttentionWork& w, dim3 grid,
                                  cudaStream_t stream);

}  // namespace fastar::cuda
