#include <stdexcept>

#include "cuda/launchers.h"
#include "cuda/tree_greedy_verify.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

cuda::RowSplit tree_greedy_split(const TreeSampleParams& prm, FloatKind kind) {
  return cuda::split_rows(prm.B * (prm.N + 1), prm.V, cuda::tile_elements(kind, kThreads), multiprocessors());
}

// Whether to read the logits level by level (only the rows the walk reads: at most max_depth + 1 of a row's
// N + 1) rather than all at once: when the rows that skips would take longer to stream than max_depth more
// launches, ~3 us each, in which every SM streams ~76 KB (an H100's 3.35 TB/s over its 132 SMs).
bool by_level(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t skipped_bytes = prm.B * (prm.N - prm.max_depth) * prm.V * (kind == FloatKind::kFloat32 ? 4 : 2);
  return skipped_bytes > prm.max_depth * multiprocessors() * int64_t{76 << 10};
}

}  // namespace

// The rows' notes (B * 2N int64), per (row, logit row, chunk) the chunk's maximum and its index, then per
// (row, logit row) whether it was read (by_level).
int64_t tree_greedy_verify_workspace(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t rows = prm.B * (prm.N + 1);
  return prm.B * 2 * prm.N * static_cast<int64_t>(sizeof(int64_t)) +
         rows * tree_greedy_split(prm, kind).chunks * static_cast<int64_t>(sizeof(float) + sizeof(int)) +
         rows * static_cast<int64_t>(sizeof(int));
}

void launch_tree_greedy_verify(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::RowSplit split = tree_greedy_split(prm, kind);
  const int64_t slots = prm.B * (prm.N + 1) * split.chunks;
  if (slots > 0x7fffffff || prm.B > 0x7fffffff)
    throw std::invalid_argument("fastar.tree_greedy_verify: too many (row, node) pairs for one launch");
  TreeSampleParams p = prm;
  p.residual = static_cast<uint64_t*>(workspace);
  float* values = reinterpret_cast<float*>(p.residual + prm.B * 2 * prm.N);
  int* indices = reinterpret_cast<int*>(values + slots);
  const cuda::GreedyPartials w{values, indices, split.chunks, split.chunk_len};
  const int64_t last_level = by_level(prm, kind) ? prm.max_depth : -1;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    for (int64_t level = last_level < 0 ? -1 : 0; level <= last_level; ++level) {
      launch_kernel("tree_greedy_verify_partial", &cuda::tree_greedy_verify_partial_kernel<decltype(tag), kThreads>,
                    dim3(static_cast<unsigned>(slots)), dim3(kThreads), 0, st, p, w,
                    cuda::TreeLevel{indices + slots, level});
    }
    launch_kernel("tree_greedy_verify_finish", &cuda::tree_greedy_verify_finish_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, p, w);
  });
}

}  // namespace fastar
