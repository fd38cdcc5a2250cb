#include <stdexcept>

#include "cuda/launchers.h"
#include "cuda/tree_speculative_sample.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

// Passes over V run split over the GPU, per row; the last step launch runs any further ones in the row's block.
// A walk makes one pass per rejected child plus one to sample: 4 cover a row that rejects up to 3 children.
constexpr int kSplitPasses = 4;

// One row per batch row, split so that B * chunks blocks fill the GPU.
cuda::RowSplit tree_sample_split(const TreeSampleParams& prm, FloatKind kind) {
  return cuda::split_rows(prm.B, prm.V, cuda::tile_elements(kind, kThreads), multiprocessors());
}

// Workspace layout: the walks, the rows' weights, the chunks' sums, then the int flags.
constexpr int64_t kWalkBytes = static_cast<int64_t>((sizeof(TreeWalk<float>) + 15) / 16 * 16);

}  // namespace

int64_t tree_speculative_sample_workspace(const TreeSampleParams& prm, FloatKind kind) {
  const int64_t slots = prm.B * tree_sample_split(prm, kind).chunks;
  return prm.B * kWalkBytes + (prm.B * prm.V + slots) * static_cast<int64_t>(sizeof(uint64_t)) +
         (slots + prm.B) * static_cast<int64_t>(sizeof(int));
}

void launch_tree_speculative_sample(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::RowSplit split = tree_sample_split(prm, kind);
  const int64_t slots = prm.B * split.chunks;
  if (slots > 0x7fffffff) throw std::invalid_argument("fastar.tree_speculative_sample: too many rows for one launch");
  auto* bytes = static_cast<unsigned char*>(workspace);
  auto* weights = reinterpret_cast<uint64_t*>(bytes + prm.B * kWalkBytes);
  auto* sums = reinterpret_cast<unsigned long long*>(weights + prm.B * prm.V);
  int* bad = reinterpret_cast<int*>(sums + slots);
  const cuda::TreeSampleWorkspace ws{bytes, bad + slots, sums, bad, weights, split.chunks, split.chunk_len};
  const int passes = split.chunks > 1 ? kSplitPasses : 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    static_assert(sizeof(TreeWalk<P>) == sizeof(TreeWalk<float>));
    const dim3 rows(static_cast<unsigned>(prm.B)), block(kThreads);
    launch_kernel("tree_sample_step", &cuda::tree_sample_step_kernel<P, kThreads>, rows, block, 0, st, prm, ws, true,
                  passes == 0);
    for (int i = 1; i <= passes; ++i) {
      launch_kernel("tree_sample_pass", &cuda::tree_sample_pass_kernel<P, kThreads>, dim3(static_cast<unsigned>(slots)),
                    block, 0, st, prm, ws);
      launch_kernel("tree_sample_step", &cuda::tree_sample_step_kernel<P, kThreads>, rows, block, 0, st, prm, ws, false,
                    i == passes);
    }
  });
}

}  // namespace fastar
