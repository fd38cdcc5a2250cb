// Torch glue of the CUDA fastar.quantize_kv_append (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/quantize_kv_append_args.h"

namespace fastar {

void run_quantize_kv_append_cuda(QuantizeKvLaunch& l) {
  DeviceScope scope(l.key, "fastar.quantize_kv_append");
  TORCH_CHECK_VALUE(l.prm.N * l.prm.Hkv <= int64_t{0x7fffffff} * 4, "fastar.quantize_kv_append: too many rows");
  launch_quantize_kv_append(l.prm, float_kind(l.key), scope.stream());
}

}  // namespace fastar
