#include <algorithm>

#include "cuda/launchers.h"
#include "cuda/spectr_accept.cuh"

namespace fastar {

void launch_spectr_accept(const SpectrParams& prm, FloatKind kind, void* stream) {
  constexpr int kThreads = 256;
  const auto st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using P = decltype(tag);
    if (prm.K >= 2 && prm.n >= 1)  // a level with k >= 2 drafts exists
      launch_kernel("spectr_solve", &cuda::spectr_solve_kernel<P, kThreads>,
                    dim3(static_cast<unsigned>(prm.K * prm.n), static_cast<unsigned>(std::min<int64_t>(prm.B, 65535))),
                    dim3(kThreads), 0, st, prm);
    launch_kernel("spectr_accept", &cuda::spectr_accept_kernel<P, kThreads>, dim3(static_cast<unsigned>(prm.B)),
                  dim3(kThreads), 0, st, prm);
  });
}

}  // namespace fastar
