// Self-tests of the SIMT emulator (simt.h): small CUDA-style kernels launched on the CPU. Built by g++ only.
//
// run_selftest(name) is input-free and deterministic. Layout of the returned values, by test:
//   pairs (computed, expected), every pair must be equal:
//     "warp0_reduction"  3 blocks x 256 threads; warp 0 alone runs the second shuffle stage; one pair per block
//     "partial_warp"     2 blocks x 80 threads; masked shuffles with width 8/16 (xor, up, idx) and a block sum
//     "shuffle_types"    shuffles of double, long long, unsigned long long, __half, __nv_bfloat16, float2-sized
//     "disjoint_masks"   the two half-warps shuffle at the same time with masks 0x0000ffff / 0xffff0000
//     "atomics"          atomicAdd/Sub/Min/Max/Or/And/Xor/Exch/CAS/Inc on int, unsigned, ull, float, double, half
//     "dynamic_smem"     FASTAR_DYNAMIC_SMEM reversal; unwritten bytes read back as the 0xFF poison
//     "ballot"           __ballot_sync/__any_sync/__all_sync/__reduce_*_sync on partial masks and a partial warp
//     "block_vote"       __syncthreads_count/_and/_or
//     "kernel_exception" (1 if the throwing launch raised std::runtime_error naming the kernel, 1), then a pair
//                        from a reduction launched afterwards (the emulator recovered)
//     "launch_errors"    (1 if rejected, 1) for: 1025 threads, zero grid dim via simt::launch, too much dynamic smem,
//                        block.z = 65; then (threads run by launch_kernel with grid.x = 0, 0)
//     "cp_async"         cp.async 16/8/4 bytes in two committed groups and one uncommitted copy: what a thread
//                        reads before any wait (old data), after wait<1> (group 0), after wait<0> (group 1,
//                        zero-filled past src-size), after committing the late copy and waiting
//     "pair_sum"         1 block x 64 threads: thread 2i adds its value into slot 2i+1 after a __syncthreads
//     "cp_async_reload"  1 block x 64 threads: a cp.async reload of shared words, waited for, read by a neighbour
//     "table_refill"     1 block x 64 threads: a 32-entry table restaged in shared memory each of 3 steps
//     "warp_exchange"    1 block x 64 threads: lanes swap shared words with a neighbour lane after a __syncwarp
//     "global16"         1 block x 32 threads: 16-byte global loads (cuda/common.cuh's load_global16), one word
//                        each, against the source array
//   pairs (value read, correct value); the values read must NOT all be correct (a planted bug):
//     "missing_syncthreads"  threads read a neighbour's shared-memory slot without the __syncthreads
//   pairs as for "pair_sum" / "cp_async_reload", with a planted bug that only some emulator modes show
//   (set_schedule, set_race_check in simt.h):
//     "pair_sum_missing_sync"           the __syncthreads is missing: a write-write race, order-dependent sums
//     "cp_async_reload_missing_wait"    the cp_async_wait is missing; the stale words equal the loaded ones
//     "table_refill_missing_sync"       the __syncthreads before each refill is missing: write-after-read
//     "warp_exchange_missing_syncwarp"  the __syncwarp is missing: read-after-write between lanes
//   pairs (input float, result converted back to float): compare with torch's .half() / .bfloat16():
//     "half_rounding"  __float2half_rn    "bf16_rounding"  __float2bfloat16_rn (ties, subnormals, overflow)
//   quadruples (a, b, __hadd(a, b), __hmul(a, b)) with a and b exact __half values:
//     "half_arith"
// These abort the process (SIGABRT) after printing a diagnosis naming the kernel to stderr; run them in a
// subprocess:
//     "divergent_barrier"  threads wait at two different __syncthreads call sites
//     "skipped_shuffle"    lanes return before a full-mask shuffle that the rest of the warp waits in
//     "bad_mask"           a lane calls __shfl_sync with a mask that does not include itself
//     "warp_mismatch"      lanes of one warp wait in different intrinsics with overlapping masks
//     "trap"               a thread calls __trap()
//     "mma_partial_warp"   mma in a warp of 16 threads
//     "mma_divergent"      the two half-warps execute different mma instructions (call sites)
//     "ldmatrix_misaligned" a lane's ldmatrix row address is not 16-byte aligned
//     "cp_async_misaligned" a 16-byte cp.async to an 8-byte aligned shared address
//     "global16_misaligned" a 16-byte global load from an 8-byte aligned address
// An unknown name throws std::invalid_argument.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastar::simt {

std::vector<std::string> selftest_names();
std::vector<double> run_selftest(const std::string& name);

// Test kernels of the tensor-core wrappers (csrc/cuda/tensor_core.cuh). Half inputs are rounded to bf16 (bf16)
// or f16 once; std::invalid_argument for wrong sizes.
// n mma problems, one warp each: a[n][32][8], b[n][32][4] (fragment elements per lane), c[n][32][4]; returns
// d[n][32][4].
std::vector<double> mma_fragments(bool bf16, const std::vector<double>& a, const std::vector<double>& b,
                                  const std::vector<double>& c);
// ldmatrix .x{count}[.trans] over a shared-memory image of 16-bit words; lane l's row starts at word
// row_offsets[l]. Returns the registers, r[32][count].
std::vector<uint32_t> ldmatrix_probe(int count, bool trans, const std::vector<int>& image,
                                     const std::vector<int>& row_offsets);
// D (16x8, row-major) = A (16x16 row-major) * B + C through cp.async, ldmatrix and mma; b is B row-major (16x8)
// when b_row_major, else its transpose (8x16). skip_wait omits the cp.async wait (a planted bug).
std::vector<double> mma_tile(bool bf16, bool b_row_major, const std::vector<double>& a, const std::vector<double>& b,
                             const std::vector<double>& c, bool skip_wait);

}  // namespace fastar::simt
