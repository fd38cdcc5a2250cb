#include "cuda/launchers.h"
#include "cuda/typical_accept.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

}  // namespace

// The rows' TypicalNode per node, per (row, logit row, chunk) the chunk's max, index, sum and weighted sum, then
// per (row, logit row) whether it was read (tree_reads_by_level). All 4-byte fields.
int64_t typical_accept_workspace(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t rows = prm.B * (prm.N + 1);
  return prm.B * prm.N * static_cast<int64_t>(sizeof(TypicalNode)) +
         rows * cuda::tree_row_split(prm, kind, kThreads).chunks * 4 * static_cast<int64_t>(sizeof(float)) +
         rows * static_cast<int64_t>(sizeof(int));
}

void launch_typical_accept(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream) {
  static_assert(sizeof(TypicalNode) % sizeof(float) == 0 && alignof(TypicalNode) <= alignof(float),
                "the partials follow the nodes 4-byte aligned");
  const cuda::RowSplit split = cuda::tree_row_split(prm, kind, kThreads);
  const int64_t slots = cuda::tree_split_slots(prm, split, "fastar.typical_accept");
  TreeSampleParams p = prm;
  p.residual = static_cast<uint64_t*>(workspace);
  float* values = reinterpret_cast<float*>(static_cast<TypicalNode*>(workspace) + prm.B * prm.N);
  int* indices = reinterpret_cast<int*>(values + slots);
  float* sums = reinterpret_cast<float*>(indices + slots);
  const cuda::TypicalPartials w{{values, indices, split.chunks, split.chunk_len}, sums, sums + slots};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    cuda::for_each_tree_level(prm, kind, [&](int64_t level) {
      launch_kernel("typical_accept_partial", &cuda::typical_accept_partial_kernel<decltype(tag), kThreads>,
                    dim3(static_cast<unsigned>(slots)), dim3(kThreads), 0, st, p, w,
                    cuda::TreeLevel{reinterpret_cast<int*>(sums + 2 * slots), level});
    });
    launch_kernel("typical_accept_finish", &cuda::typical_accept_finish_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, p, w);
  });
}

}  // namespace fastar
