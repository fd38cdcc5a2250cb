// Host entry points of the CUDA kernels. No torch and no CUDA headers here: the glue (.cpp, compiled by
// the host compiler) calls them with raw pointers and a stream; each .cu defines its launcher. The same
// launchers are compiled by g++ over the SIMT emulator for fastar._C_simt.
#pragma once
#include <cstdint>

#include "core/acceptance.h"

namespace fastar {

// stream: a cudaStream_t (ignored by the SIMT emulator).
void launch_speculative_sample(const SpeculativeSampleParams& prm, FloatKind kind, void* stream);
void launch_greedy_verify(const GreedyVerifyParams& prm, FloatKind kind, void* stream);

}  // namespace fastar
