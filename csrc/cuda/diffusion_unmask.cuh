// CUDA kernels of fastar.diffusion_unmask.
//  scores: one block per position of the current block (an unmasked one exits at once). Passes over the V
//    logits (16-byte loads where the row is aligned), which stay in L2 after the first: the maximum and second largest
//    value (per-thread top-2, merged by thread 0) and NaN / +inf; with Dream's filters, the smallest kept logit
//    (radix selects of the k-th largest logit and of the nucleus's boundary, cuda/radix_select.cuh); the
//    fixed-point softmax sums (core/diffusion.h); the candidate: the lowest index of the maximum, or at a temperature
//    the fixed-point inverse CDF (each warp sums a contiguous segment, thread 0 picks the segment, that warp scans it
//    32 tokens at a time). Integer sums make the candidate and its confidence identical to the CPU kernel's.
//  select: one block per row, after scores on the same stream: each thread ranks its positions against the
//    row's masked ones (O(Lb) each), the descending confidences go to a scratch row for the factor rule, then
//    the committed candidates are written into x. A row with an invalid position commits nothing and gets
//    remaining = -1.
#pragma once
#include "core/diffusion.h"
#include "cuda/common.cuh"
#include "cuda/radix_select.cuh"

namespace fastar::cuda {

// Calls f(t, logit t) for this thread's share of the row's V logits: 16-byte loads over the row's aligned middle,
// single elements for the unaligned head and the tail. Which thread sees which token differs from a strided walk;
// the passes that use it are order-independent (maxima, integer sums, the minimum index of the maximum).
template <typename P, int kThreads, typename F>
__device__ __forceinline__ void for_each_logit(const P* row, int64_t V, int tid, F f) {
  constexpr int kVec = 16 / sizeof(P);
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16);
  int64_t head = misalign % sizeof(P) ? V : (16 - misalign) % 16 / static_cast<int64_t>(sizeof(P));
  head = head < V ? head : V;
  const int64_t vecs = (V - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v = tid; v < vecs; v += kThreads) {
    const uint4 raw = body[v];
#pragma unroll
    for (int e = 0; e < kVec; ++e) f(head + v * kVec + e, vector_element<P>(raw, e));
  }
  for (int64_t t = tid; t < head; t += kThreads) f(t, to_float(row[t]));
  for (int64_t t = head + vecs * kVec + tid; t < V; t += kThreads) f(t, to_float(row[t]));
}

template <typename P, int kThreads>
__global__ void __launch_bounds__(kThreads) diffusion_scores_kernel(DiffusionUnmaskParams prm) {
  using namespace diffusion;
  constexpr int kWarps = kThreads / 32;
  __shared__ float s_first[kThreads], s_second[kThreads];
  __shared__ long long s_index[kThreads];
  __shared__ int s_nan[kThreads];
  __shared__ unsigned long long s_warp_sum[kWarps];
  __shared__ float s_max, s_next;
  __shared__ int s_status;
  __shared__ int s_pick_warp;
  __shared__ unsigned long long s_pick_target;
  __shared__ RadixSelectShared s_radix;
  __shared__ float s_cut;          // the smallest logit the filters keep (-inf: every one)
  __shared__ PositionSums s_sums;  // thread 0's sums, kept for the confidence after the candidate

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t i = blockIdx.x, b = i / prm.block_len, p = prm.block_start + i % prm.block_len, V = prm.V;
  if (prm.x[b * prm.L + p] != prm.mask_id) {  // block-uniform
    if (tid == 0) {
      prm.candidates[i] = -1;
      prm.confidence[i] = -INFINITY;
      prm.status[i] = kOk;
    }
    return;
  }
  const P* row = static_cast<const P*>(prm.logits) + b * prm.s_row + p * prm.s_pos;

  float first = -INFINITY, second = -INFINITY;
  int nan = 0;
  for_each_logit<P, kThreads>(row, V, tid, [&](int64_t, float g) {
    nan |= g != g;
    if (g > first) {
      second = first;
      first = g;
    } else if (g > second) {
      second = g;
    }
  });
  s_first[tid] = first;
  s_second[tid] = second;
  s_nan[tid] = nan;
  __syncthreads();
  if (tid == 0) {
    float m1 = -INFINITY, m2 = -INFINITY;
    int any_nan = 0;
    auto push = [&](float v) {
      if (v > m1) {
        m2 = m1;
        m1 = v;
      } else if (v > m2) {
        m2 = v;
      }
    };
    for (int k = 0; k < kThreads; ++k) {
      any_nan |= s_nan[k];
      push(s_first[k]);
      push(s_second[k]);
    }
    s_max = m1;
    s_next = m2;
    s_status = any_nan || m1 == INFINITY ? kBadValue : m1 == -INFINITY ? kNoFiniteLogit : kOk;
  }
  __syncthreads();
  if (s_status != kOk) {  // block-uniform
    if (tid == 0) {
      prm.candidates[i] = -1;
      prm.confidence[i] = -INFINITY;
      prm.status[i] = s_status;
    }
    return;
  }
  const float m = s_max;
  const int32_t kind = prm.confidence_kind;

  if (prm.top_k || prm.top_p_fixed) {
    uint32_t tau = 0;
    if (prm.top_k) {
      tau = block_radix_select<kThreads>(
          V, 0, [&](uint64_t) { return static_cast<uint64_t>(prm.top_k); },
          [&](int64_t t, uint32_t* key) {
            *key = sampling::order_key(to_float(row[t]));
            return uint64_t{1};
          },
          s_radix);
    }
    if (prm.top_p_fixed) {  // the row's total comes from the select's first histogram
      const float beta = prm.filter_beta;
      const uint32_t boundary = block_radix_select<kThreads>(
          V, 0, [&](uint64_t total) { return nucleus_target(prm.top_p_fixed, total); },
          [&](int64_t t, uint32_t* key) {
            const float g = to_float(row[t]);
            *key = sampling::order_key(g);
            return sample_weight(g, m, beta);
          },
          s_radix);
      tau = boundary > tau ? boundary : tau;
    }
    if (tid == 0) s_cut = sampling::key_float(tau);
  } else if (tid == 0) {
    s_cut = -INFINITY;
  }
  __syncthreads();
  const float beta = prm.conf_beta, conf_cut = prm.conf_filtered ? s_cut : -INFINITY;

  uint64_t total = 0, entropy = 0;
  if (kind != kRandom) {
    for_each_logit<P, kThreads>(row, V, tid, [&](int64_t, float g) {
      if (!(g >= conf_cut)) return;
      const float e = sampling::exp_nonpositive((g - m) * beta);
      total += accept::fixed_weight(e);
      if (kind == kNegEntropy) entropy += accept::fixed_weight(entropy_term(e, g, m, beta));
    });
    total = block_sum<kWarps>(total, s_warp_sum);
    if (kind == kNegEntropy) entropy = block_sum<kWarps>(entropy, s_warp_sum);
  }
  if (tid == 0) s_sums = PositionSums{total, entropy, 0};

  // The position's Philox draw, made by thread 0 where it is used.
  auto draw = [&] { return accept::draw(prm.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(p)); };
  const float inv_t = prm.inv_temperature;
  if (inv_t > 0) {
    auto weight = [&](int64_t t) {
      const float g = to_float(row[t]);
      return g >= s_cut ? sample_weight(g, m, inv_t) : 0;
    };
    int64_t begin, end;
    warp_segment<kWarps>(V, warp, &begin, &end);
    uint64_t sum = 0;
    for (int64_t t = begin + lane; t < end; t += 32) sum += weight(t);
    sum = warp_sum(sum);
    if (lane == 0) s_warp_sum[warp] = sum;
    __syncthreads();
    if (tid == 0) {  // the total is >= 2^40: the maximum's weight
      uint64_t all = 0;
      for (int w = 0; w < kWarps; ++w) all += s_warp_sum[w];
      uint64_t target = accept::sample_target(draw().sample_bits, all);
      int w = 0;
      while (target >= s_warp_sum[w]) target -= s_warp_sum[w++];
      s_pick_warp = w;
      s_pick_target = target;
    }
    __syncthreads();
    if (warp == s_pick_warp) {
      const int64_t t = warp_find_token(begin, end, s_pick_target, lane, weight);
      if (lane == 0) s_index[0] = t;
    }
    __syncthreads();
  } else {
    long long first_hit = V;
    for_each_logit<P, kThreads>(row, V, tid, [&](int64_t t, float g) {
      if (g == m && t < first_hit) first_hit = t;
    });
    s_index[tid] = first_hit;
    __syncthreads();
    if (tid == 0) {
      for (int k = 1; k < kThreads; ++k) first_hit = s_index[k] < first_hit ? s_index[k] : first_hit;
      s_index[0] = first_hit;
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t token = s_index[0];
    const bool second_kept = s_next >= (prm.conf_filtered ? s_cut : -INFINITY);
    PositionSums s = s_sums;
    s.second = kind == kMargin && second_kept ? sample_weight(s_next, m, prm.conf_beta) : 0;
    prm.candidates[i] = token;
    prm.confidence[i] =
        confidence_of(kind, s, to_float(row[token]), m, prm.conf_beta, draw().accept_u, prm.confidence_noise);
    prm.status[i] = kOk;
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) diffusion_select_kernel(DiffusionUnmaskParams prm) {
  using namespace diffusion;
  __shared__ int s_bad;
  __shared__ long long s_n, s_quota;
  __shared__ unsigned s_committed;  // positions of the row's block
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, Lb = prm.block_len;
  const int64_t* cand = prm.candidates + b * Lb;
  const float* conf = prm.confidence + b * Lb;
  float* sorted = prm.sorted + b * Lb;
  if (tid == 0) {
    int bad = 0;
    long long n = 0;
    for (int64_t j = 0; j < Lb; ++j) {
      bad |= prm.status[b * Lb + j];
      n += cand[j] >= 0;
    }
    if (prm.num_transfer && prm.num_transfer[b] < 0) bad |= kBadCount;
    s_bad = bad;
    s_n = n;
    s_committed = 0;
  }
  __syncthreads();
  if (s_bad) {  // block-uniform
    if (tid == 0) prm.remaining[b] = -1;
    return;
  }
  auto rank_of = [&](int64_t j) {
    int64_t r = 0;
    for (int64_t k = 0; k < Lb; ++k) r += cand[k] >= 0 && ahead(conf[k], k, conf[j], j);
    return r;
  };
  for (int64_t j = tid; j < Lb; j += kThreads) {
    if (cand[j] >= 0) sorted[rank_of(j)] = conf[j];
  }
  __syncthreads();
  if (tid == 0) {
    s_quota = rank_quota(prm.rule, s_n, prm.num_transfer ? prm.num_transfer[b] : 0, sorted, prm.threshold, prm.factor);
  }
  __syncthreads();
  unsigned committed = 0;
  for (int64_t j = tid; j < Lb; j += kThreads) {
    if (cand[j] >= 0 && rank_of(j) < s_quota) {
      prm.x[b * prm.L + prm.block_start + j] = cand[j];
      committed += cand[j] != prm.mask_id;
    }
  }
  if (committed) atomicAdd(&s_committed, committed);
  __syncthreads();
  if (tid == 0) prm.remaining[b] = s_n - static_cast<int64_t>(s_committed);
}

}  // namespace fastar::cuda
