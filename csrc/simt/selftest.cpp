// Self-tests of the SIMT emulator: kernels written as for nvcc, run on the CPU. Layouts are in selftest.h.
#include "selftest.h"

#include "cuda/common.cuh"
#include "simt.h"
#include "tensor_core_selftest.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
using namespace fastar::cuda;            // the tensor-core wrappers, as a kernel calls them
using namespace fastar::cuda::selftest;  // the kernels shared with the nvcc build check

// ---------------------------------------------------------------------------------------------------------------
// Kernels

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Each block sums its segment; warp leaders meet in shared memory and only warp 0 runs the second stage.
__global__ void __launch_bounds__(256) block_sum_kernel(const float* x, int per_block, float* out) {
  __shared__ float warp_sums[32];
  const float* seg = x + blockIdx.x * per_block;
  float v = 0.f;
  for (int i = threadIdx.x; i < per_block; i += blockDim.x) v += seg[i];
  v = warp_sum(v);
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + warpSize - 1) / warpSize;
    v = lane < nwarps ? warp_sums[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// blockDim.x need not be a multiple of 32: the last warp names only its own lanes in every mask.
__global__ void partial_warp_kernel(const float* x, float* seg8, float* seg16, float* scan8, float* bcast16,
                                    float* block_total) {
  __shared__ float warp_sums[32];
  const unsigned lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const unsigned lanes_here = min(unsigned(warpSize), blockDim.x - warp * warpSize);
  const unsigned mask = lanes_here == 32 ? kFullMask : (1u << lanes_here) - 1u;
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[g];

  float s8 = v;
  for (int m = 4; m > 0; m /= 2) s8 += __shfl_xor_sync(mask, s8, m, 8);
  float s16 = v;
  for (int m = 8; m > 0; m /= 2) s16 += __shfl_xor_sync(mask, s16, m, 16);
  float scan = v;
  for (unsigned d = 1; d < 8; d *= 2) {
    const float up = __shfl_up_sync(mask, scan, d, 8);
    if (lane % 8 >= d) scan += up;
  }
  seg8[g] = s8;
  seg16[g] = s16;
  scan8[g] = scan;
  bcast16[g] = __shfl_sync(mask, v, 3, 16);

  float w = v;
  for (unsigned offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_down_sync(mask, w, offset);
    if (lane + offset < lanes_here) w += other;
  }
  if (lane == 0) warp_sums[warp] = w;
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = (blockDim.x + warpSize - 1) / warpSize;
    float t = lane < nwarps ? warp_sums[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) block_total[blockIdx.x] = t;
  }
}

__global__ void shuffle_types_kernel(double* d, long long* ll, unsigned long long* ull, float* h, float* bf,
                                     float* h2) {
  const int lane = threadIdx.x;
  d[lane] = __shfl_xor_sync(kFullMask, 1.0 / (lane + 1) + 1e10, 5);
  ll[lane] = __shfl_sync(kFullMask, -3000000000LL * lane, (lane + 7) % 32);
  ull[lane] = __shfl_up_sync(kFullMask, (unsigned long long)lane << 40, 3);
  h[lane] = __half2float(__shfl_down_sync(kFullMask, __float2half_rn(lane * 0.5f), 2));
  bf[lane] = __bfloat162float(__shfl_xor_sync(kFullMask, __float2bfloat16_rn(lane * 2.0f), 31));
  const __half2 pair = __shfl_sync(kFullMask, __floats2half2_rn(float(lane), float(-lane)), 9);
  h2[lane] = __low2float(pair) - __high2float(pair);
}

// The two half-warps reduce at the same time, at different call sites, with disjoint masks.
__global__ void half_warp_sum_kernel(const int* x, int* out) {
  const unsigned lane = threadIdx.x % warpSize;
  int v = x[threadIdx.x];
  if (lane < 16) {
    for (int m = 8; m > 0; m /= 2) v += __shfl_xor_sync(0x0000ffffu, v, m, 16);
  } else {
    for (int m = 1; m < 16; m *= 2) v += __shfl_xor_sync(0xffff0000u, v, m, 16);
  }
  out[threadIdx.x] = v;
}

__global__ void neighbour_kernel(float* out) {
  __shared__ float tile[128];
  tile[threadIdx.x] = -1.f;
  __syncthreads();
  tile[threadIdx.x] = float(blockIdx.x * 1000 + threadIdx.x);
  // Planted bug: a __syncthreads() belongs here.
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x];
}

// Thread 2i adds its value into slot 2i+1 after thread 2i+1 stored there; skip_sync drops the __syncthreads in
// between (a planted bug: a write-write race, and the result depends on the order threads run in).
__global__ void pair_sum_kernel(const float* x, float* out, bool skip_sync) {
  __shared__ float buf[64];
  const unsigned t = threadIdx.x;
  buf[t] = x[t];
  if (!skip_sync) __syncthreads();
  if (t % 2 == 0) buf[t + 1] += buf[t];
  __syncthreads();
  out[t] = buf[t];
}

// Each thread stores its 4 words, reloads the same words by cp.async and reads its neighbour's after a
// __syncthreads; skip_wait drops the cp_async_wait before it (a planted bug that the stale, equal words hide).
__global__ void cp_async_reload_kernel(const uint32_t* src, uint32_t* out, bool skip_wait) {
  __shared__ __align__(16) uint32_t s[64 * 4];
  const unsigned t = threadIdx.x;
  uint32_t* mine = s + 4 * t;
  for (int i = 0; i < 4; ++i) mine[i] = src[4 * t + i];
  cp_async_16(mine, src + 4 * t);
  cp_async_commit();
  if (!skip_wait) cp_async_wait<0>();
  __syncthreads();
  const uint32_t* next = s + 4 * ((t + 1) % blockDim.x);
  for (int i = 0; i < 4; ++i) out[4 * t + i] = next[i];
  cp_async_wait<0>();
}

// Every step, threads 0..31 stage 32 table entries in shared memory and all threads read one; skip_sync drops the
// __syncthreads that keeps the next step's refill from overwriting entries other threads have yet to read (a
// planted bug: a write-after-read race, as in a kernel that restages a page table per step).
__global__ void table_refill_kernel(const int* table, int steps, int* out, bool skip_sync) {
  __shared__ int s_table[32];
  const unsigned t = threadIdx.x;
  int acc = 0;
  for (int step = 0; step < steps; ++step) {
    if (t < 32) s_table[t] = table[step * 32 + t];
    __syncthreads();
    acc += s_table[(t * 7 + step) % 32];
    if (!skip_sync) __syncthreads();
  }
  out[t] = acc;
}

// Each lane stores a word and reads its neighbour lane's after a __syncwarp, which orders shared memory between
// the lanes of a warp; skip_syncwarp drops it (a planted bug).
__global__ void warp_exchange_kernel(const int* x, int* out, bool skip_syncwarp) {
  __shared__ int s[64];
  const unsigned t = threadIdx.x;
  s[t] = x[t];
  if (!skip_syncwarp) __syncwarp();
  out[t] = s[t ^ 1];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void skipped_shuffle_kernel(const float* x, float* out) {
  const unsigned lane = threadIdx.x % warpSize;
  float v = x[threadIdx.x];
  if (lane >= 24) return;  // planted bug: these lanes never reach the full-mask shuffle
  v += __shfl_down_sync(kFullMask, v, 1);
  out[threadIdx.x] = v;
}

__global__ void bad_mask_kernel(float* out) {
  const unsigned lane = threadIdx.x % warpSize;
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, float(lane), 1);  // planted bug: lane 0 is not in its mask
}

__global__ void warp_mismatch_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % warpSize;
  if (lane < 16)
    out[threadIdx.x] = __shfl_xor_sync(kFullMask, lane, 1);
  else
    out[threadIdx.x] = __ballot_sync(kFullMask, lane & 1);  // planted bug: the warp disagrees on the intrinsic
}

__global__ void trap_kernel(const int* flags) {
  if (flags[threadIdx.x]) __trap();
}

__global__ void to_half_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __half2float(__float2half_rn(in[i]));
}

__global__ void to_bf16_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __bfloat162float(__float2bfloat16_rn(in[i]));
}

__global__ void half_arith_kernel(const float* a, const float* b, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half ha = __float2half_rn(a[i]), hb = __float2half_rn(b[i]);
  out[4 * i + 0] = __half2float(ha);
  out[4 * i + 1] = __half2float(hb);
  out[4 * i + 2] = __half2float(__hadd(ha, hb));
  out[4 * i + 3] = __half2float(__hmul(ha, hb));
}

struct AtomicCounters {
  int count, sub, imax, imin, lock, locked;
  unsigned usum, umax, bits_or, bits_and, bits_xor, inc, dec, ticket;
  unsigned long long ullsum, ullmin, cas_sum;
  long long llmax;
  float fsum;
  double dsum;
  __half hsum;
  int partials[8];
  int final_sum;
};

__global__ void atomics_kernel(AtomicCounters* c) {
  __shared__ bool is_last;
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&c->count, 1);
  atomicSub(&c->sub, 2);
  atomicAdd(&c->usum, unsigned(g));
  atomicAdd(&c->ullsum, 1ull << 33);
  atomicAdd(&c->fsum, float(g % 7));
  atomicAdd(&c->dsum, 0.5 * g);
  atomicAdd(&c->hsum, __float2half_rn(1.0f));
  atomicMax(&c->imax, (g * 7919) % 10007 - 5000);
  atomicMin(&c->imin, (g * 7919) % 10007 - 5000);
  atomicMax(&c->umax, unsigned(g) * 3u);
  atomicMin(&c->ullmin, 1000000ull + g);
  atomicMax(&c->llmax, -(long long)g);
  atomicOr(&c->bits_or, 1u << (g % 32));
  atomicAnd(&c->bits_and, ~(1u << (g % 16)));
  atomicXor(&c->bits_xor, unsigned(g));
  atomicInc(&c->inc, 9u);
  atomicDec(&c->dec, 9u);
  unsigned long long old = c->cas_sum, assumed;
  do {
    assumed = old;
    old = atomicCAS(&c->cas_sum, assumed, assumed + 3);
  } while (assumed != old);
  while (atomicCAS(&c->lock, 0, 1) != 0) {
  }
  c->locked += 1;
  __threadfence();
  atomicExch(&c->lock, 0);
  // "Last block finishes the reduction".
  if (threadIdx.x == 0) {
    c->partials[blockIdx.x] = blockIdx.x + 1;
    __threadfence();
    is_last = atomicAdd(&c->ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    int s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += c->partials[b];
    c->final_sum = s;
  }
}

__global__ void reverse_kernel(const float* in, float* out, unsigned* poison, unsigned* aligned) {
  FASTAR_DYNAMIC_SMEM(float, buf);
  const unsigned n = blockDim.x * blockDim.y;
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
  buf[t] = in[b * n + t];
  __syncthreads();
  out[b * n + t] = buf[n - 1 - t];
  if (t == 0) {
    poison[b] = reinterpret_cast<const unsigned*>(buf)[n];  // never written
    aligned[b] = reinterpret_cast<uintptr_t>(buf) % 16 == 0;
  }
}

__global__ void vote_kernel(unsigned* ballot, int* any, int* all, unsigned* reduced) {
  const unsigned t = threadIdx.x, lane = t % warpSize, warp = t / warpSize;
  const int pred = t % 3 == 0;
  if (warp == 0) {
    if (lane % 2 == 0) {
      ballot[t] = __ballot_sync(0x55555555u, pred);
      any[t] = __any_sync(0x55555555u, lane == 6);
      all[t] = __all_sync(0x55555555u, lane < 32);
      reduced[t] = __reduce_add_sync(0x55555555u, lane);
    } else {
      ballot[t] = __ballot_sync(0xaaaaaaaau, pred);
      any[t] = __any_sync(0xaaaaaaaau, 0);
      all[t] = __all_sync(0xaaaaaaaau, lane != 7);
      reduced[t] = __reduce_max_sync(0xaaaaaaaau, lane * 5 % 17);
    }
  } else {  // a partial warp
    const unsigned mask = (1u << (blockDim.x - 32)) - 1u;
    ballot[t] = __ballot_sync(mask, pred);
    any[t] = __any_sync(mask, lane == 15);
    all[t] = __all_sync(mask, 1);
    reduced[t] = unsigned(__reduce_min_sync(mask, 100 - int(lane)) + __reduce_or_sync(mask, 1u << lane));
    __syncwarp(mask);
  }
}

__global__ void block_vote_kernel(int* out) {
  const unsigned t = threadIdx.x;
  out[6 * t + 0] = __syncthreads_count(t % 3 == 0);
  out[6 * t + 1] = __syncthreads_and(t < blockDim.x);
  out[6 * t + 2] = __syncthreads_and(t != 50);
  out[6 * t + 3] = __syncthreads_or(t == 99);
  out[6 * t + 4] = __syncthreads_or(0);
  if (t >= 90) return;  // exited threads no longer count
  out[6 * t + 5] = __syncthreads_count(1);
}

__global__ void throwing_kernel(int bad_block) {
  if (int(blockIdx.x) == bad_block && threadIdx.x == 5) throw std::runtime_error("planted failure");
  __syncthreads();
}

__global__ void count_kernel(int* counter) { atomicAdd(counter, 1); }

__global__ void mma_partial_warp_kernel(float* out) {
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4], c[4] = {0, 0, 0, 0};
  mma_m16n8k16_bf16(d, a, b, c);  // planted bug: the block's second warp has 16 threads
  out[threadIdx.x] = d[0];
}

__global__ void mma_divergent_kernel(float* out) {
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4], c[4] = {0, 0, 0, 0};
  if (threadIdx.x < 16)
    mma_m16n8k16_bf16(d, a, b, c);
  else
    mma_m16n8k16_bf16(d, a, b, c);  // planted bug: half the warp executes another mma instruction
  out[threadIdx.x] = d[0];
}

__global__ void ldmatrix_misaligned_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[8 * 8 + 8];
  tile[threadIdx.x] = uint16_t(threadIdx.x);
  __syncthreads();
  uint32_t r[1];
  ldmatrix_x1(r, tile + 8 * (threadIdx.x % 8) + (threadIdx.x == 3 ? 4 : 0));  // planted bug: lane 3 is 8 bytes off
  out[threadIdx.x] = r[0];
}

__global__ void cp_async_misaligned_kernel(const uint32_t* src, uint32_t* out) {
  __shared__ __align__(16) uint32_t s[32 * 4 + 2];
  cp_async_16(s + 4 * threadIdx.x + 2, src + 4 * threadIdx.x);  // planted bug: dst is 8 bytes off
  cp_async_commit();
  cp_async_wait<0>();
  out[threadIdx.x] = s[4 * threadIdx.x + 2];
}

// Thread i loads 16 bytes at src + 4 i + offset words (offset 0: aligned; 2: 8 bytes off, a planted bug).
__global__ void global16_kernel(const uint32_t* src, int offset, uint32_t* out) {
  const uint4 v = fastar::cuda::load_global16(src + 4 * threadIdx.x + offset);
  out[4 * threadIdx.x] = v.x;
  out[4 * threadIdx.x + 1] = v.y;
  out[4 * threadIdx.x + 2] = v.z;
  out[4 * threadIdx.x + 3] = v.w;
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

using Values = std::vector<double>;

void add_pair(Values& r, double computed, double expected) {
  r.push_back(computed);
  r.push_back(expected);
}

Values block_sums(int blocks, int per_block) {
  std::vector<float> x(size_t(blocks) * per_block);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 37 % 101) - 50);
  std::vector<float> out(blocks, -1.f);
  fastar::launch_kernel("block_sum_kernel", block_sum_kernel, dim3(blocks), dim3(256), 0, nullptr, x.data(), per_block,
                        out.data());
  Values r;
  for (int b = 0; b < blocks; ++b) {
    double expected = 0;
    for (int i = 0; i < per_block; ++i) expected += x[size_t(b) * per_block + i];
    add_pair(r, out[b], expected);
  }
  return r;
}

Values test_warp0_reduction() { return block_sums(3, 1000); }

Values test_partial_warp() {
  const int blocks = 2, threads = 80, n = blocks * threads;
  std::vector<float> x(n), seg8(n), seg16(n), scan8(n), bcast16(n), total(blocks);
  for (int i = 0; i < n; ++i) x[i] = float(i * 7 % 23 - 11);
  fastar::launch_kernel("partial_warp_kernel", partial_warp_kernel, dim3(blocks), dim3(threads), 0, nullptr, x.data(),
                        seg8.data(), seg16.data(), scan8.data(), bcast16.data(), total.data());
  Values r;
  for (int g = 0; g < n; ++g) {
    const int lane = g % threads % 32, warp_base = g - lane;
    double s8 = 0, s16 = 0, scan = 0;
    for (int l = lane & ~7; l < (lane & ~7) + 8; ++l) s8 += x[warp_base + l];
    for (int l = lane & ~15; l < (lane & ~15) + 16; ++l) s16 += x[warp_base + l];
    for (int l = lane & ~7; l <= lane; ++l) scan += x[warp_base + l];
    add_pair(r, seg8[g], s8);
    add_pair(r, seg16[g], s16);
    add_pair(r, scan8[g], scan);
    add_pair(r, bcast16[g], x[warp_base + (lane & ~15) + 3]);
  }
  for (int b = 0; b < blocks; ++b) {
    double expected = 0;
    for (int i = 0; i < threads; ++i) expected += x[b * threads + i];
    add_pair(r, total[b], expected);
  }
  return r;
}

Values test_shuffle_types() {
  std::vector<double> d(32);
  std::vector<long long> ll(32);
  std::vector<unsigned long long> ull(32);
  std::vector<float> h(32), bf(32), h2(32);
  fastar::launch_kernel("shuffle_types_kernel", shuffle_types_kernel, dim3(1), dim3(32), 0, nullptr, d.data(),
                        ll.data(), ull.data(), h.data(), bf.data(), h2.data());
  Values r;
  for (int lane = 0; lane < 32; ++lane) {
    add_pair(r, d[lane], 1.0 / ((lane ^ 5) + 1) + 1e10);
    add_pair(r, double(ll[lane]), double(-3000000000LL * ((lane + 7) % 32)));
    add_pair(r, double(ull[lane]), double((unsigned long long)(lane >= 3 ? lane - 3 : lane) << 40));
    add_pair(r, h[lane], lane + 2 < 32 ? (lane + 2) * 0.5 : lane * 0.5);
    add_pair(r, bf[lane], (lane ^ 31) * 2.0);
    add_pair(r, h2[lane], 18.0);
  }
  return r;
}

Values test_disjoint_masks() {
  std::vector<int> x(32), out(32, -1);
  for (int i = 0; i < 32; ++i) x[i] = i * i - 7;
  fastar::launch_kernel("half_warp_sum_kernel", half_warp_sum_kernel, dim3(1), dim3(32), 0, nullptr, x.data(),
                        out.data());
  Values r;
  for (int i = 0; i < 32; ++i) {
    double expected = 0;
    for (int j = i & ~15; j < (i & ~15) + 16; ++j) expected += x[j];
    add_pair(r, out[i], expected);
  }
  return r;
}

Values test_missing_syncthreads() {
  const int blocks = 2, threads = 128;
  std::vector<float> out(blocks * threads);
  fastar::launch_kernel("neighbour_kernel", neighbour_kernel, dim3(blocks), dim3(threads), 0, nullptr, out.data());
  Values r;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) add_pair(r, out[b * threads + t], b * 1000 + (t + 1) % threads);
  return r;
}

Values run_pair_sum(bool skip_sync) {
  std::vector<float> x(64), out(64);
  for (int i = 0; i < 64; ++i) x[i] = float(i + 1);
  fastar::launch_kernel("pair_sum_kernel", pair_sum_kernel, dim3(1), dim3(64), 0, nullptr, x.data(), out.data(),
                        skip_sync);
  Values r;
  for (int i = 0; i < 64; ++i) add_pair(r, out[i], i % 2 ? x[i] + x[i - 1] : x[i]);
  return r;
}
Values test_pair_sum() { return run_pair_sum(false); }
Values test_pair_sum_missing_sync() { return run_pair_sum(true); }

Values run_cp_async_reload(bool skip_wait) {
  alignas(16) uint32_t src[256];
  std::vector<uint32_t> out(256);
  for (int i = 0; i < 256; ++i) src[i] = 0x1000u + i;
  fastar::launch_kernel("cp_async_reload_kernel", cp_async_reload_kernel, dim3(1), dim3(64), 0, nullptr, src,
                        out.data(), skip_wait);
  Values r;
  for (int i = 0; i < 256; ++i) add_pair(r, out[i], src[(i + 4) % 256]);
  return r;
}
Values test_cp_async_reload() { return run_cp_async_reload(false); }
Values test_cp_async_reload_missing_wait() { return run_cp_async_reload(true); }

Values run_table_refill(bool skip_sync) {
  const int steps = 3, threads = 64;
  std::vector<int> table(steps * 32), out(threads);
  for (int i = 0; i < steps * 32; ++i) table[i] = 1 + i * i % 97;
  fastar::launch_kernel("table_refill_kernel", table_refill_kernel, dim3(1), dim3(threads), 0, nullptr, table.data(),
                        steps, out.data(), skip_sync);
  Values r;
  for (int t = 0; t < threads; ++t) {
    int want = 0;
    for (int step = 0; step < steps; ++step) want += table[step * 32 + (t * 7 + step) % 32];
    add_pair(r, out[t], want);
  }
  return r;
}
Values test_table_refill() { return run_table_refill(false); }
Values test_table_refill_missing_sync() { return run_table_refill(true); }

Values run_warp_exchange(bool skip_syncwarp) {
  std::vector<int> x(64), out(64);
  for (int i = 0; i < 64; ++i) x[i] = 100 + i;
  fastar::launch_kernel("warp_exchange_kernel", warp_exchange_kernel, dim3(1), dim3(64), 0, nullptr, x.data(),
                        out.data(), skip_syncwarp);
  Values r;
  for (int i = 0; i < 64; ++i) add_pair(r, out[i], x[i ^ 1]);
  return r;
}
Values test_warp_exchange() { return run_warp_exchange(false); }
Values test_warp_exchange_missing_syncwarp() { return run_warp_exchange(true); }

Values test_divergent_barrier() {
  std::vector<int> out(64);
  fastar::launch_kernel("divergent_barrier_kernel", divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr,
                        out.data());
  return {};
}

Values test_skipped_shuffle() {
  std::vector<float> x(64, 1.f), out(64);
  fastar::launch_kernel("skipped_shuffle_kernel", skipped_shuffle_kernel, dim3(1), dim3(64), 0, nullptr, x.data(),
                        out.data());
  return {};
}

Values test_bad_mask() {
  std::vector<float> out(32);
  fastar::launch_kernel("bad_mask_kernel", bad_mask_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  return {};
}

Values test_warp_mismatch() {
  std::vector<unsigned> out(32);
  fastar::launch_kernel("warp_mismatch_kernel", warp_mismatch_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  return {};
}

Values test_trap() {
  std::vector<int> flags(32, 0);
  flags[17] = 1;
  fastar::launch_kernel("trap_kernel", trap_kernel, dim3(1), dim3(32), 0, nullptr, flags.data());
  return {};
}

Values convert(const char* name, void (*kernel)(const float*, float*, int), const std::vector<float>& in) {
  const int n = int(in.size());
  std::vector<float> out(n);
  fastar::launch_kernel(name, kernel, dim3((n + 31) / 32), dim3(32), 0, nullptr, in.data(), out.data(), n);
  Values r;
  for (int i = 0; i < n; ++i) add_pair(r, in[i], out[i]);
  return r;
}

Values test_half_rounding() {
  const std::vector<float> in = {1.0f,
                                 1.0f + 0x1p-11f,
                                 1.0f + 0x3p-11f,
                                 1.0f + 0x1p-11f + 0x1p-20f,
                                 2049.0f,
                                 2051.0f,
                                 65504.0f,
                                 65519.99f,
                                 65520.0f,
                                 -65520.0f,
                                 1e6f,
                                 0x1p-14f,
                                 0x1p-15f,
                                 0x1p-24f,
                                 0x1p-25f,
                                 0x3p-25f,
                                 0x1p-26f,
                                 0x1.8p-24f,
                                 0.1f,
                                 1.0f / 3.0f,
                                 -0.0f,
                                 -2.5f,
                                 3.14159265f,
                                 1e-5f,
                                 6e-8f,
                                 -1e-8f,
                                 1e-30f};
  return convert("to_half_kernel", to_half_kernel, in);
}

Values test_bf16_rounding() {
  const std::vector<float> in = {1.0f,          1.0f + 0x1p-8f, 1.0f + 0x3p-8f,  1.0f + 0x1p-8f + 0x1p-20f,
                                 257.0f,        259.0f,         3.3895314e38f,   3.38e38f,
                                 3.4028235e38f, -3.4028235e38f, 1.17549435e-38f, 1e-40f,
                                 0x1p-133f,     0x1p-134f,      0x3p-134f,       0x1p-135f,
                                 0.1f,          1.0f / 3.0f,    -0.0f,           -2.5f,
                                 3.14159265f,   1e-5f,          65504.0f,        1e30f};
  return convert("to_bf16_kernel", to_bf16_kernel, in);
}

Values test_half_arith() {
  const std::vector<float> a = {1.0f,   1.0f,     65504.0f, 1000.5f, 3.0f, 255.875f,
                                300.0f, 0x1p-14f, 0x1p-14f, -1.5f,   0.1f, 2049.0f};
  const std::vector<float> b = {0x1p-11f, 0x3p-11f, 16.0f,      0.25f, 1.0f / 3.0f, 255.875f,
                                300.0f,   0x1p-10f, 0x1.8p-11f, 2.5f,  0.2f,        1.0f};
  const int n = int(a.size());
  std::vector<float> out(4 * n);
  fastar::launch_kernel("half_arith_kernel", half_arith_kernel, dim3(1), dim3(32), 0, nullptr, a.data(), b.data(),
                        out.data(), n);
  return Values(out.begin(), out.end());
}

Values test_atomics() {
  const int blocks = 4, threads = 256, n = blocks * threads;
  AtomicCounters c{};
  c.imax = -1000000;
  c.imin = 1000000;
  c.ullmin = ~0ull;
  c.llmax = -(1LL << 40);
  c.bits_and = ~0u;
  c.hsum = __float2half_rn(0.0f);
  fastar::launch_kernel("atomics_kernel", atomics_kernel, dim3(blocks), dim3(threads), 0, nullptr, &c);

  int imax = -1000000, imin = 1000000;
  unsigned usum = 0, bits_or = 0, bits_and = ~0u, bits_xor = 0;
  double fsum = 0, dsum = 0;
  for (int g = 0; g < n; ++g) {
    const int v = (g * 7919) % 10007 - 5000;
    imax = std::max(imax, v);
    imin = std::min(imin, v);
    usum += unsigned(g);
    fsum += g % 7;
    dsum += 0.5 * g;
    bits_or |= 1u << (g % 32);
    bits_and &= ~(1u << (g % 16));
    bits_xor ^= unsigned(g);
  }
  Values r;
  add_pair(r, c.count, n);
  add_pair(r, c.sub, -2 * n);
  add_pair(r, c.usum, usum);
  add_pair(r, double(c.ullsum), double(n) * double(1ull << 33));
  add_pair(r, c.fsum, fsum);
  add_pair(r, c.dsum, dsum);
  add_pair(r, __half2float(c.hsum), n);
  add_pair(r, c.imax, imax);
  add_pair(r, c.imin, imin);
  add_pair(r, c.umax, 3.0 * (n - 1));
  add_pair(r, double(c.ullmin), 1000000.0);
  add_pair(r, double(c.llmax), 0.0);
  add_pair(r, c.bits_or, bits_or);
  add_pair(r, c.bits_and, bits_and);
  add_pair(r, c.bits_xor, bits_xor);
  add_pair(r, c.inc, n % 10);
  add_pair(r, c.dec, (10 - n % 10) % 10);
  add_pair(r, double(c.cas_sum), 3.0 * n);
  add_pair(r, c.locked, n);
  add_pair(r, c.lock, 0);
  add_pair(r, c.ticket, blocks);
  add_pair(r, c.final_sum, blocks * (blocks + 1) / 2);
  return r;
}

Values test_dynamic_smem() {
  const dim3 grid(2, 2), block(16, 4);
  const int nb = 4, nt = 64;
  std::vector<float> in(nb * nt), out(nb * nt);
  std::vector<unsigned> poison(nb), aligned(nb);
  for (int i = 0; i < nb * nt; ++i) in[i] = float(i) * 0.5f;
  fastar::launch_kernel("reverse_kernel", reverse_kernel, grid, block, (nt + 4) * sizeof(float), nullptr, in.data(),
                        out.data(), poison.data(), aligned.data());
  Values r;
  for (int b = 0; b < nb; ++b) {
    for (int t = 0; t < nt; ++t) add_pair(r, out[b * nt + t], in[b * nt + nt - 1 - t]);
    add_pair(r, poison[b], 0xffffffffu);
    add_pair(r, aligned[b], 1);
  }
  return r;
}

Values test_ballot() {
  const int threads = 48;
  std::vector<unsigned> ballot(threads), reduced(threads);
  std::vector<int> any(threads), all(threads);
  fastar::launch_kernel("vote_kernel", vote_kernel, dim3(1), dim3(threads), 0, nullptr, ballot.data(), any.data(),
                        all.data(), reduced.data());
  unsigned even_ballot = 0, odd_ballot = 0, even_sum = 0, odd_max = 0, tail_ballot = 0, tail_or = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    const bool pred = lane % 3 == 0;
    if (lane % 2 == 0) {
      even_ballot |= unsigned(pred) << lane;
      even_sum += lane;
    } else {
      odd_ballot |= unsigned(pred) << lane;
      odd_max = std::max(odd_max, lane * 5 % 17);
    }
  }
  for (unsigned lane = 0; lane < 16; ++lane) {
    tail_ballot |= unsigned((32 + lane) % 3 == 0) << lane;
    tail_or |= 1u << lane;
  }
  Values r;
  for (int t = 0; t < threads; ++t) {
    if (t >= 32) {
      add_pair(r, ballot[t], tail_ballot);
      add_pair(r, any[t], 1);
      add_pair(r, all[t], 1);
      add_pair(r, reduced[t], (100 - 15) + tail_or);
    } else if (t % 2 == 0) {
      add_pair(r, ballot[t], even_ballot);
      add_pair(r, any[t], 1);
      add_pair(r, all[t], 1);
      add_pair(r, reduced[t], even_sum);
    } else {
      add_pair(r, ballot[t], odd_ballot);
      add_pair(r, any[t], 0);
      add_pair(r, all[t], 0);
      add_pair(r, reduced[t], odd_max);
    }
  }
  return r;
}

Values test_block_vote() {
  const int threads = 100;
  std::vector<int> out(6 * threads, -1);
  fastar::launch_kernel("block_vote_kernel", block_vote_kernel, dim3(1), dim3(threads), 0, nullptr, out.data());
  Values r;
  for (int t = 0; t < threads; ++t) {
    add_pair(r, out[6 * t + 0], 34);
    add_pair(r, out[6 * t + 1], 1);
    add_pair(r, out[6 * t + 2], 0);
    add_pair(r, out[6 * t + 3], 1);
    add_pair(r, out[6 * t + 4], 0);
    add_pair(r, out[6 * t + 5], t < 90 ? 90 : -1);
  }
  return r;
}

Values test_kernel_exception() {
  bool caught = false;
  try {
    fastar::launch_kernel("throwing_kernel", throwing_kernel, dim3(3), dim3(64), 0, nullptr, 1);
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    caught = what.find("throwing_kernel") != std::string::npos && what.find("planted failure") != std::string::npos;
  }
  Values r;
  add_pair(r, caught, 1);
  const Values after = block_sums(1, 500);
  r.insert(r.end(), after.begin(), after.end());
  return r;
}

Values test_launch_errors() {
  const auto rejected = [](dim3 grid, dim3 block, size_t smem) {
    try {
      fastar::simt::launch("empty_kernel", grid, block, smem, [] {});
    } catch (const std::runtime_error&) {
      return 1.0;
    }
    return 0.0;
  };
  Values r;
  add_pair(r, rejected(dim3(1), dim3(1025), 0), 1);
  add_pair(r, rejected(dim3(4, 0), dim3(32), 0), 1);
  add_pair(r, rejected(dim3(1), dim3(32), 300 * 1024), 1);
  add_pair(r, rejected(dim3(1), dim3(1, 1, 65), 0), 1);
  int counter = 0;
  fastar::launch_kernel("count_kernel", count_kernel, dim3(0), dim3(32), 0, nullptr, &counter);
  add_pair(r, counter, 0);
  return r;
}

Values test_cp_async() {
  std::vector<uint32_t> src(256), out(4 * 256);
  for (int i = 0; i < 256; ++i) src[i] = 0xB0000000u + 0x10101u * uint32_t(i);
  fastar::launch_kernel("cp_async_kernel", cp_async_kernel, dim3(1), dim3(32), 0, nullptr, src.data(), out.data());
  Values r;
  for (int w = 0; w < 256; ++w) {
    const int i = w % 8;
    const uint32_t old = 0xA0000000u + uint32_t(w);
    const uint32_t five_bytes = i == 4 ? src[w] : i == 5 ? src[w] & 0xffu : 0u;  // little-endian bytes 0..4
    const uint32_t group1 = i < 4 ? src[w] : i < 7 ? five_bytes : old;
    add_pair(r, out[w], old);                                // nothing lands before a wait
    add_pair(r, out[256 + w], i < 4 ? src[w] : old);         // wait<1>: group 0 only
    add_pair(r, out[2 * 256 + w], group1);                   // wait<0>: group 1, zero-filled
    add_pair(r, out[3 * 256 + w], i < 7 ? group1 : src[w]);  // the late copy, once committed
  }
  return r;
}

Values test_mma_partial_warp() {
  std::vector<float> out(48);
  fastar::launch_kernel("mma_partial_warp_kernel", mma_partial_warp_kernel, dim3(1), dim3(48), 0, nullptr, out.data());
  return {};
}

Values test_mma_divergent() {
  std::vector<float> out(32);
  fastar::launch_kernel("mma_divergent_kernel", mma_divergent_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  return {};
}

Values test_ldmatrix_misaligned() {
  std::vector<uint32_t> out(32);
  fastar::launch_kernel("ldmatrix_misaligned_kernel", ldmatrix_misaligned_kernel, dim3(1), dim3(32), 0, nullptr,
                        out.data());
  return {};
}

Values test_cp_async_misaligned() {
  std::vector<uint32_t> src(128, 1), out(32);
  fastar::launch_kernel("cp_async_misaligned_kernel", cp_async_misaligned_kernel, dim3(1), dim3(32), 0, nullptr,
                        src.data(), out.data());
  return {};
}

Values test_global16() {
  alignas(16) uint32_t src[32 * 4 + 4];
  for (uint32_t i = 0; i < 32 * 4 + 4; ++i) src[i] = 0x9e3779b9u * (i + 1);
  std::vector<uint32_t> out(32 * 4);
  fastar::launch_kernel("global16_kernel", global16_kernel, dim3(1), dim3(32), 0, nullptr, src, 0, out.data());
  Values v;
  for (size_t i = 0; i < out.size(); ++i) {
    v.push_back(out[i]);
    v.push_back(src[i]);
  }
  return v;
}

Values test_global16_misaligned() {
  alignas(16) uint32_t src[32 * 4 + 4] = {};
  std::vector<uint32_t> out(32 * 4);
  fastar::launch_kernel("global16_kernel", global16_kernel, dim3(1), dim3(32), 0, nullptr, src, 2, out.data());
  return {};
}

struct Test {
  const char* name;
  Values (*run)();
};

constexpr Test kTests[] = {
    {"warp0_reduction", test_warp0_reduction},
    {"partial_warp", test_partial_warp},
    {"shuffle_types", test_shuffle_types},
    {"disjoint_masks", test_disjoint_masks},
    {"missing_syncthreads", test_missing_syncthreads},
    {"pair_sum", test_pair_sum},
    {"pair_sum_missing_sync", test_pair_sum_missing_sync},
    {"cp_async_reload", test_cp_async_reload},
    {"cp_async_reload_missing_wait", test_cp_async_reload_missing_wait},
    {"table_refill", test_table_refill},
    {"table_refill_missing_sync", test_table_refill_missing_sync},
    {"warp_exchange", test_warp_exchange},
    {"warp_exchange_missing_syncwarp", test_warp_exchange_missing_syncwarp},
    {"divergent_barrier", test_divergent_barrier},
    {"skipped_shuffle", test_skipped_shuffle},
    {"bad_mask", test_bad_mask},
    {"warp_mismatch", test_warp_mismatch},
    {"trap", test_trap},
    {"half_rounding", test_half_rounding},
    {"bf16_rounding", test_bf16_rounding},
    {"half_arith", test_half_arith},
    {"atomics", test_atomics},
    {"dynamic_smem", test_dynamic_smem},
    {"ballot", test_ballot},
    {"block_vote", test_block_vote},
    {"kernel_exception", test_kernel_exception},
    {"launch_errors", test_launch_errors},
    {"cp_async", test_cp_async},
    {"mma_partial_warp", test_mma_partial_warp},
    {"mma_divergent", test_mma_divergent},
    {"ldmatrix_misaligned", test_ldmatrix_misaligned},
    {"cp_async_misaligned", test_cp_async_misaligned},
    {"global16", test_global16},
    {"global16_misaligned", test_global16_misaligned},
};

template <typename T>
uint16_t half_bits(double x) {
  T h;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    h = __float2bfloat16_rn(float(x));
  else
    h = __float2half_rn(float(x));
  uint16_t bits;
  std::memcpy(&bits, static_cast<const void*>(&h), 2);
  return bits;
}

uint16_t to_half_bits(bool bf16, double x) { return bf16 ? half_bits<__nv_bfloat16>(x) : half_bits<__half>(x); }

void require_size(const std::vector<double>& v, size_t n, const char* what) {
  if (v.size() != n)
    throw std::invalid_argument(std::string("fastar simt: ") + what + " has " + std::to_string(v.size()) +
                                " values, expected " + std::to_string(n));
}

template <typename T>
std::vector<double> run_mma_tile(const std::vector<double>& a, const std::vector<double>& b, bool b_row_major,
                                 const std::vector<double>& c, bool skip_wait) {
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  alignas(16) uint16_t ha[16 * 16], hb[16 * 8];
  for (int i = 0; i < 16 * 16; ++i) ha[i] = to_half_bits(bf16, a[i]);
  for (int i = 0; i < 16 * 8; ++i) hb[i] = to_half_bits(bf16, b[i]);
  std::vector<float> fc(c.begin(), c.end()), d(16 * 8);
  fastar::launch_kernel("mma_tile_kernel", mma_tile_kernel<T>, dim3(1), dim3(32), (16 * 16 + 16 * 8) * sizeof(T),
                        nullptr, reinterpret_cast<const T*>(ha), reinterpret_cast<const T*>(hb), b_row_major, fc.data(),
                        d.data(), skip_wait);
  return std::vector<double>(d.begin(), d.end());
}

}  // namespace

namespace fastar::simt {

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const Test& t : kTests) names.emplace_back(t.name);
  return names;
}

std::vector<double> run_selftest(const std::string& name) {
  for (const Test& t : kTests)
    if (name == t.name) return t.run();
  throw std::invalid_argument("fastar simt: unknown self-test '" + name + "'");
}

std::vector<double> mma_fragments(bool bf16, const std::vector<double>& a, const std::vector<double>& b,
                                  const std::vector<double>& c) {
  const size_t n = c.size() / 128;
  require_size(a, n * 256, "a");
  require_size(b, n * 128, "b");
  require_size(c, n * 128, "c");
  if (n == 0) throw std::invalid_argument("fastar simt: mma_fragments needs at least one problem");
  std::vector<uint32_t> pa(n * 128), pb(n * 64);
  for (size_t i = 0; i < pa.size(); ++i)
    pa[i] = uint32_t(to_half_bits(bf16, a[2 * i + 1])) << 16 | to_half_bits(bf16, a[2 * i]);
  for (size_t i = 0; i < pb.size(); ++i)
    pb[i] = uint32_t(to_half_bits(bf16, b[2 * i + 1])) << 16 | to_half_bits(bf16, b[2 * i]);
  std::vector<float> fc(c.begin(), c.end()), d(n * 128);
  fastar::launch_kernel("mma_fragments_kernel", mma_fragments_kernel, dim3(unsigned(n)), dim3(32), 0, nullptr, bf16,
                        pa.data(), pb.data(), fc.data(), d.data());
  return std::vector<double>(d.begin(), d.end());
}

std::vector<uint32_t> ldmatrix_probe(int count, bool trans, const std::vector<int>& image,
                                     const std::vector<int>& row_offsets) {
  if (count != 1 && count != 2 && count != 4) throw std::invalid_argument("fastar simt: count must be 1, 2 or 4");
  if (row_offsets.size() != 32) throw std::invalid_argument("fastar simt: row_offsets needs 32 values");
  const int halves = int(image.size());
  for (int off : row_offsets)
    if (off < 0 || off + 8 > halves) throw std::invalid_argument("fastar simt: a row offset is outside the image");
  std::vector<uint16_t> img(image.begin(), image.end());
  std::vector<uint32_t> out(32 * size_t(count));
  fastar::launch_kernel("ldmatrix_kernel", ldmatrix_kernel, dim3(1), dim3(32), size_t(halves) * 2, nullptr, count,
                        trans, img.data(), halves, row_offsets.data(), out.data());
  return out;
}

std::vector<double> mma_tile(bool bf16, bool b_row_major, const std::vector<double>& a, const std::vector<double>& b,
                             const std::vector<double>& c, bool skip_wait) {
  require_size(a, 16 * 16, "a");
  require_size(b, 16 * 8, "b");
  require_size(c, 16 * 8, "c");
  return bf16 ? run_mma_tile<__nv_bfloat16>(a, b, b_row_major, c, skip_wait)
              : run_mma_tile<__half>(a, b, b_row_major, c, skip_wait);
}

}  // namespace fastar::simt
