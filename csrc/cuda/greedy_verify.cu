#include <stdexcept>

#include "cuda/greedy_verify.cuh"
#include "cuda/launchers.h"

namespace fastar {
namespace {

constexpr int kThreads = 256;

cuda::RowSplit greedy_split(const GreedyVerifyParams& prm, FloatKind kind) {
  return cuda::split_rows(prm.B * (prm.n + 1), prm.V, cuda::tile_elements(kind, kThreads), multiprocessors());
}

}  // namespace

int64_t greedy_verify_workspace(const GreedyVerifyParams& prm, FloatKind kind) {
  return prm.B * (prm.n + 1) * greedy_split(prm, kind).chunks * static_cast<int64_t>(sizeof(float) + sizeof(int));
}

void launch_greedy_verify(const GreedyVerifyParams& prm, FloatKind kind, void* workspace, void* stream) {
  const cuda::RowSplit split = greedy_split(prm, kind);
  const int64_t slots = prm.B * (prm.n + 1) * split.chunks;
  if (slots > 0x7fffffff || prm.B > 0x7fffffff)
    throw std::invalid_argument("fastar.greedy_verify: too many (row, position) pairs for one launch");
  cuda::GreedyPartials w{static_cast<float*>(workspace), reinterpret_cast<int*>(static_cast<float*>(workspace) + slots),
                         split.chunks, split.chunk_len};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    launch_kernel("greedy_verify_partial", &cuda::greedy_verify_partial_kernel<decltype(tag), kThreads>,
                  dim3(static_cast<unsigned>(slots)), dim3(kThreads), 0, st, prm, w);
  });
  launch_kernel("greedy_verify_finish", &cuda::greedy_verify_finish_kernel<kThreads>,
                dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, prm, w);
}

}  // namespace fastar
