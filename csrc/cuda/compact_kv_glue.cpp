// Torch glue of the CUDA fastar.compact_kv (compiled for CUDA and for the SIMT build, see glue.h).
#include "cuda/glue.h"
#include "cuda/launchers.h"
#include "ops/compact_kv_args.h"

namespace fastar {

void run_compact_kv_cuda(CompactKvLaunch& l) {
  DeviceScope scope(l.k_cache, "fastar.compact_kv");
  TORCH_CHECK_VALUE(l.prm.B <= 65535, "fastar.compact_kv: at most 65535 sequences per call on CUDA, got ", l.prm.B);
  launch_compact_kv(l.prm, scope.stream());
}

}  // namespace fastar
