// fastar.sample_cfg on the CPU: argument checks (ops/sample_cfg_args.h), then the kernel of the active ISA
// (cpu/kernels/sample_cfg.cpp); invalid positions raise.
#include <vector>

#include "cpu/kernels/sample_cfg.h"
#include "ops.h"
#include "ops/sample_cfg_args.h"

namespace fastar {

using namespace sampling;

at::Tensor sample_cfg_cpu(const at::Tensor& logits, double cfg, c10::string_view schedule,
                          std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                          double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset) {
  constexpr const char* op = "fastar.sample_cfg";
  SampleCfgLaunch l =
      prepare_sample_cfg(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset);
  TORCH_CHECK_VALUE(l.logits.is_cpu(), op, ": expected CPU tensors");
  l.prm.seed = PhiloxSeed{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint64_t>(offset.item<int64_t>()),
                          nullptr, nullptr};
  std::vector<int32_t> status(static_cast<size_t>(l.prm.B * l.prm.L));
  FASTAR_CPU_DISPATCH(sample_cfg, l.prm, float_kind(l.logits), status.data());
  for (size_t i = 0; i < status.size(); ++i) {
    TORCH_CHECK_VALUE(status[i] == kOk, op, ": invalid logits at batch row ", i / l.prm.L, ", position ", i % l.prm.L,
                      ": ", describe_sample_status(status[i]));
  }
  return l.tokens;
}

}  // namespace fastar
