// What differs between the two builds of the CUDA glue: the device guard and stream, and where the seed
// lives. fastar._C: CUDA tensors. fastar._C_simt (FASTAR_SIMT): CPU tensors, kernels run by the emulator.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "core/philox.h"

#if !defined(FASTAR_SIMT)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastar {

class DeviceScope {
 public:
  DeviceScope(const at::Tensor& t, const char* op)
#if !defined(FASTAR_SIMT)
      : guard_(t.device())
#endif
  {
#if defined(FASTAR_SIMT)
    TORCH_CHECK_VALUE(t.is_cpu(), op, ": the SIMT build runs on CPU tensors, got ", t.device());
#else
    TORCH_CHECK_VALUE(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
#endif
  }

  void* stream() const { return current_stream(); }

  // The current stream of the current device (which a DeviceScope has set).
  static void* current_stream() {
#if defined(FASTAR_SIMT)
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream().stream();
#endif
  }

 private:
#if !defined(FASTAR_SIMT)
  c10::cuda::CUDAGuard guard_;
#endif
};

// A seed tensor on the device is read by the kernel (no host sync; CUDA graphs can replay with new
// values); one on the CPU is passed by value. The SIMT build always takes the pointer path, so the tests
// exercise the code the GPU runs for device-resident seeds.
inline bool read_by_kernel(const at::Tensor& t) {
#if defined(FASTAR_SIMT)
  return true;
#else
  return t.is_cuda();
#endif
}

inline PhiloxSeed philox_seed(const at::Tensor& seed, const at::Tensor& offset) {
  PhiloxSeed s{0, 0, nullptr, nullptr};
  if (read_by_kernel(seed)) {
    s.seed_ptr = seed.data_ptr<int64_t>();
  } else {
    s.seed = static_cast<uint64_t>(seed.item<int64_t>());
  }
  if (read_by_kernel(offset)) {
    s.offset_ptr = offset.data_ptr<int64_t>();
  } else {
    s.offset = static_cast<uint64_t>(offset.item<int64_t>());
  }
  return s;
}

}  // namespace fastar
