#include <algorithm>
#include "cuda/launchers.h"
#include "cuda/spectr_accept.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

int64_t nodes_bytes(const SpectrParams& prm) {
  return prm.B * prm.K * prm.n * static_cast<int64_t>(sizeof(spectr::Node)) +
         prm.B * static_cast<int64_t>(sizeof(cuda::SpectrRow));
}

}  // namespace

// The solved levels (spectr::Node per batch row, draft and level), the walks' ends (SpectrRow per batch row), then
// the chunk sums of the rows drawn from.
int64_t spectr_accept_workspace(const SpectrParams& prm, FloatKind kind) {
  return nodes_bytes(prm) + cuda::chunk_layout(prm.B, prm.V, kind, kThreads, "fastar.spectr_accept").bytes();
}

void launch_spectr_accept(const SpectrParams& params, FloatKind kind, void* workspace, void* stream) {
  const cuda::ChunkLayout layout = cuda::chunk_layout(params.B, params.V, kind, kThreads, "fastar.spectr_accept");
  SpectrParams prm = params;
  prm.nodes = workspace;
  auto* rows = reinterpret_cast<cuda::SpectrRow*>(static_cast<spectr::Node*>(workspace) + prm.B * prm.K * prm.n);
  const cuda::SpectrDraws w{rows, layout.at(static_cast<char*>(workspace) + nodes_bytes(prm))};
  const auto st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    if (prm.K >= 2 && prm.n >= 1)  // a level with k >= 2 drafts exists
      launch_kernel("spectr_solve", &cuda::spectr_solve_kernel<P, kThreads>,
                    dim3(static_cast<unsigned>(prm.K * prm.n), static_cast<unsigned>(std::min<int64_t>(prm.B, 65535))),
                    dim3(kThreads), 0, st, prm);
    launch_kernel("spectr_walk", &cuda::spectr_walk_kernel<P, kThreads>, dim3(static_cast<unsigned>(prm.B)),
                  dim3(kThreads), 0, st, prm, w);
    launch_kernel("spectr_draw_partial", &cuda::spectr_draw_partial_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(layout.slots)), dim3(kThreads), 0, st, prm, w);
    launch_kernel("spectr_draw_finish", &cuda::spectr_draw_finish_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, prm, w);
  });
}

}  // namespace fastar
