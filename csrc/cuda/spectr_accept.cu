#include <algorithm>
#include "cuda/launchers.h"
#include "cuda/spectr_accept.cuh"

namespace fastar {
namespace {

constexpr int kThreads = 256;

int64_t nodes(const SpectrParams& prm) { return prm.B * prm.K * prm.n; }

// The solve's split of each node's rows over V: one block per node while the nodes fill the GPU, else chunks.
cuda::RowSplit solve_split(const SpectrParams& prm, FloatKind kind) {
  if (nodes(prm) == 0) return cuda::RowSplit{1, prm.V};  // no level (n = 0): nothing to solve
  return cuda::split_rows(nodes(prm), prm.V, cuda::tile_elements(kind, kThreads), multiprocessors());
}

// The solved levels (spectr::Node per batch row, draft and level), the walks' ends (SpectrRow per batch row), a
// split solve's merged passes (SpectrSolveState per node), then the chunk sums of the rows drawn from.
struct Layout {
  int64_t nodes_at, rows_at, states_at, sums_at;
  cuda::RowSplit solve;
  cuda::ChunkLayout draw;
};
Layout layout(const SpectrParams& prm, FloatKind kind) {
  Layout l{};
  l.solve = solve_split(prm, kind);
  l.draw = cuda::chunk_layout(prm.B, prm.V, kind, kThreads, "fastar.spectr_accept");
  if (prm.K * prm.n * l.solve.chunks > 0x7fffffff)  // the solve's grid.x
    throw std::invalid_argument("fastar.spectr_accept: too many drafts for one launch");
  l.rows_at = nodes(prm) * static_cast<int64_t>(sizeof(spectr::Node));
  l.states_at = l.rows_at + prm.B * static_cast<int64_t>(sizeof(cuda::SpectrRow));
  const int64_t states = l.solve.chunks > 1 ? nodes(prm) : 0;
  l.sums_at = l.states_at + states * static_cast<int64_t>(sizeof(cuda::SpectrSolveState));
  return l;
}

}  // namespace

int64_t spectr_accept_workspace(const SpectrParams& prm, FloatKind kind) {
  const Layout l = layout(prm, kind);
  return l.sums_at + l.draw.bytes();
}

void launch_spectr_accept(const SpectrParams& params, FloatKind kind, void* workspace, void* stream) {
  const Layout l = layout(params, kind);
  auto* base = static_cast<char*>(workspace);
  SpectrParams prm = params;
  prm.nodes = base;
  const cuda::SpectrSolveSplit solve{
      l.solve.chunks > 1 ? reinterpret_cast<cuda::SpectrSolveState*>(base + l.states_at) : nullptr, l.solve.chunks,
      l.solve.chunk_len};
  const cuda::SpectrDraws w{reinterpret_cast<cuda::SpectrRow*>(base + l.rows_at), l.draw.at(base + l.sums_at)};
  const auto st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    if (prm.K >= 2 && prm.n >= 1) {  // a level with k >= 2 drafts exists: every pass at once, or one per launch
      const dim3 grid(static_cast<unsigned>(prm.K * prm.n * solve.chunks),
                      static_cast<unsigned>(std::min<int64_t>(prm.B, 65535)));
      for (int pass = 0; pass < spectr::kPasses; pass += solve.states ? 1 : spectr::kPasses)
        launch_kernel("spectr_solve", &cuda::spectr_solve_kernel<P, kThreads>, grid, dim3(kThreads), 0, st, prm, solve,
                      pass, solve.states ? pass + 1 : spectr::kPasses);
    }
    launch_kernel("spectr_walk", &cuda::spectr_walk_kernel<P, kThreads>, dim3(static_cast<unsigned>(prm.B)),
                  dim3(kThreads), 0, st, prm, w);
    launch_kernel("spectr_draw_partial", &cuda::spectr_draw_partial_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(l.draw.slots)), dim3(kThreads), 0, st, prm, w);
    launch_kernel("spectr_draw_finish", &cuda::spectr_draw_finish_kernel<P, kThreads>,
                  dim3(static_cast<unsigned>(prm.B)), dim3(kThreads), 0, st, prm, w);
  });
}

}  // namespace fastar
