// Qualifiers for math shared by the CPU kernels (g++), the CUDA kernels (nvcc) and the SIMT build (g++).
#pragma once

#if defined(__CUDACC__)
#define FASTAR_HD __host__ __device__ __forceinline__
#else
#define FASTAR_HD inline
#endif
