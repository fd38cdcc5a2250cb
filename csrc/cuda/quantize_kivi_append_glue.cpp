// Torch glue of the CUDA fastar.quantize_kivi_append (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/quantize_kivi_append_args.h"

namespace fastar {

void run_quantize_kivi_append_cuda(KiviAppendLaunch& l) {
  DeviceScope scope(l.key, "fastar.quantize_kivi_append");
  TORCH_CHECK_VALUE(l.prm.Nk / l.prm.G <= 0x7fffffff && l.prm.Nv * l.prm.Hkv * l.prm.D <= 0x7fffffffLL * 128,
                    "fastar.quantize_kivi_append: too many rows");
  launch_quantize_kivi_append(l.prm, float_kind(l.key), scope.stream());
}

}  // namespace fastar
