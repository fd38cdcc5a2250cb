// Host entry of the CUDA diffusion_unmask kernels (cuda/diffusion_unmask.cu), called by its glue with raw
// pointers and a stream (a cudaStream_t, ignored by the SIMT emulator).
#pragma once
#include "core/diffusion.h"
#include "core/dtype.h"

namespace fastar {

void launch_diffusion_unmask(const DiffusionUnmaskParams& prm, FloatKind kind, void* stream);

}  // namespace fastar
