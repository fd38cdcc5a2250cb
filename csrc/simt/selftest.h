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
//   pairs (value read, correct value); the values read must NOT all be correct (a planted bug):
//     "missing_syncthreads"  threads read a neighbour's shared-memory slot without the __syncthreads
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
// An unknown name throws std::invalid_argument.
#pragma once

#include <string>
#include <vector>

namespace fastar::simt {

std::vector<std::string> selftest_names();
std::vector<double> run_selftest(const std::string& name);

}  // namespace fastar::simt
