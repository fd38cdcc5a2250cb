// The test-only library torch.ops.fastar_simt: the same schemas as torch.ops.fastar, implemented for CPU
// tensors by the CUDA launchers and glue compiled over the SIMT emulator.
#include "schemas.h"

TORCH_LIBRARY(fastar_simt, m) { fastar::define_schemas(m); }

TORCH_LIBRARY_IMPL(fastar_simt, CPU, m) { fastar::register_cuda_kernels(m); }
