#include "schemas.h"

TORCH_LIBRARY(fastar, m) {
  fastar::define_schemas(m);
  fastar::define_cpu_test_schemas(m);
}

TORCH_LIBRARY_IMPL(fastar, CPU, m) { fastar::register_cpu_kernels(m); }

#if defined(FASTAR_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastar, CUDA, m) { fastar::register_cuda_kernels(m); }
#endif
