// Block-wide radix select by count or by mass over the order keys of a row's logits (core/sampling.h), used by
// sample_cfg's and diffusion_unmask's top-k and top-p cuts: 8 bits per pass over the row, a shared 256-bin
// histogram of SplitSum bins (native 32-bit atomics).
#pragma once
#include "cuda/common.cuh"

namespace fastar::cuda {

struct RadixSelectShared {
  SplitSum hist[256];
  uint32_t prefix;
  unsigned long long remaining;
};

// The largest key T such that the weights of the tokens with key >= max(T, floor) sum to at least target(total),
// total being their sum over keys >= floor, which the first pass's histogram gives (1 <= target(total) <= total).
// key_weight(t, &key) returns token t's weight (1 to count tokens) and its key. Bins are walked from the top, so a
// weight is only ever added to larger keys' sums.
template <int kThreads, typename Target, typename KeyWeight>
__device__ __forceinline__ uint32_t block_radix_select(int64_t V, uint32_t floor, Target target, KeyWeight key_weight,
                                                       RadixSelectShared& sh) {
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid == 0) sh.prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) sh.hist[i] = SplitSum{0, 0};
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    for (int64_t t = tid; t < V; t += kThreads) {
      uint32_t key;
      const uint64_t w = key_weight(t, &key);
      const bool candidate = shift == 24 || (key >> (shift + 8)) == (prefix >> (shift + 8));
      if (w && candidate && key >= floor) sh.hist[(key >> shift) & 255u].add(w);
    }
    __syncthreads();
    if (tid < 32) {  // lane i holds bins 255 - 8i down to 248 - 8i
      uint64_t sum = 0;
      for (int j = 0; j < 8; ++j) sum += sh.hist[255 - 8 * lane - j].value();
      const uint64_t incl = warp_inclusive_scan(sum, lane);
      const uint64_t need = shift == 24 ? target(__shfl_sync(kFullMask, incl, 31)) : sh.remaining;
      const int first = __ffs(__ballot_sync(kFullMask, incl >= need)) - 1;
      __syncwarp();  // every lane has read sh.remaining before `first` rewrites it (a ballot orders no memory)
      if (lane == first) {
        uint64_t above = incl - sum;
        int bin = 255 - 8 * lane;
        while (above + sh.hist[bin].value() < need) above += sh.hist[bin--].value();
        sh.prefix = prefix | (static_cast<uint32_t>(bin) << shift);
        sh.remaining = need - above;
      }
    }
    __syncthreads();
  }
  const uint32_t key = sh.prefix;
  __syncthreads();  // read by every thread before a next select rewrites it
  return key;
}

}  // namespace fastar::cuda
