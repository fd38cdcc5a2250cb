// fastar.sample_cfg on the CPU (ops/sample_cfg_args.h): the kernel of the active ISA
// (cpu/kernels/sample_cfg.cpp); invalid positions raise.
#include <vector>

#include "cpu/kernels/sample_cfg.h"
#include "ops/sample_cfg_args.h"

namespace fastar {

void run_sample_cfg_cpu(SampleCfgLaunch& l) {
  constexpr const char* op = "fastar.sample_cfg";
  TORCH_CHECK_VALUE(l.logits.is_cpu(), op, ": expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(l.seed.item<int64_t>()),
                          static_cast<uint64_t>(l.offset.item<int64_t>()), nullptr, nullptr};
  std::vector<int32_t> status(static_cast<size_t>(l.prm.B * l.prm.L));
  FASTAR_CPU_DISPATCH(sample_cfg, l.prm, float_kind(l.logits), status.data());
  for (size_t i = 0; i < status.size(); ++i) {
    TORCH_CHECK_VALUE(status[i] == sampling::kOk, op, ": invalid logits at batch row ", i / l.prm.L, ", position ",
                      i % l.prm.L, ": ", describe_sample_status(status[i]));
  }
}

}  // namespace fastar
