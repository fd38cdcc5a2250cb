#include "cuda/launchers.h"
#include "cuda/tree_greedy_verify.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

}  // namespace

// The rows' notes (B * 2N int64), per (row, logit row, chunk) the chunk's maximum and its index, then per
// (row, logit row) whether it was read (tree_reads_by_level).
int64_t tree_greedy_verify_workspace(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t rows = prm.B * (prm.N + 1);
  return prm.B * 2 * prm.N * static_cast<int64_t>(sizeof(int64_t)) +
         rows * cuda::tree_row_split(prm, kind, kThreads).chunks * static_cast<int64_t>(sizeof(float) + sizeof(int)) +
         rows * static_cast<int64_t>(sizeof(int));
}

void launch_tree_greedy_verify(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::RowSplit split = cuda::tree_row_split(prm, kind, kThreads);
  const int64_t slots = cuda::tree_split_slots(prm, split, "fastar.tree_greedy_verify");
  TreeSampleParams p = prm;
  p.residual = static_cast<uint64_t*>(workspace);
  float* values = reinterpret_cast<float*>(p.residual + prm.B * 2 * prm.N);
  int* indices = reinterpret_cast<int*>(values + slots);
  const cuda::GreedyPartials w{values, indices, split.chunks, split.chunk_len};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    cuda::for_each_tree_level(prm, kind, [&](int64_t level) {
      launch_kernel("tree_greedy_verify_partial", &cuda::tree_greedy_verify_partial_kernel<decltype(tag), kThreads>,
                    dim3(static_cast<unsigned>(slots)), dim3(kThreads), 0, st, p, w,
                    cuda::TreeLevel{indices + slots, level});
    });
    launch_kernel("tree_greedy_verify_finish", &cuda::tree_greedy_verify_finish_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, p, w);
  });
}

}  // namespace fastar
