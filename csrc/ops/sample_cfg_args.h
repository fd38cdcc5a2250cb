// Argument checks, guidance weights and output allocation of fastar.sample_cfg, shared by the CPU and CUDA glue so
// that every backend rejects the same inputs with the same message and mixes with the same two float weights.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "core/sampling.h"
#include "ops/common.h"

namespace fastar {

struct SampleCfgLaunch {
  at::Tensor logits, tokens, seed, offset;
  SampleCfgParams prm;
};

// The guided logit is (cond_w * cond + uncond_w * uncond): VAR's (1 + t) cond - t uncond with
// t = cfg * scale_index / (num_scales - 1), or LlamaGen's uncond + cfg (cond - uncond), divided by temperature.
// Computed in double and rounded once, so every backend gets the same two floats.
inline void guidance_weights(const char* op, c10::string_view schedule, double cfg, std::optional<int64_t> scale_index,
                             std::optional<int64_t> num_scales, double temperature, SampleCfgParams& prm) {
  TORCH_CHECK_VALUE(std::isfinite(cfg) && cfg >= 0, op, ": cfg must be finite and >= 0, got ", cfg);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
                    temperature);
  double cond_w = 0, uncond_w = 0;
  if (schedule == "var") {
    TORCH_CHECK_VALUE(scale_index && num_scales, op,
                      ": schedule='var' needs scale_index and num_scales (t = cfg * scale_index / (num_scales - 1))");
    TORCH_CHECK_VALUE(*num_scales >= 2, op, ": num_scales must be >= 2, got ", *num_scales);
    TORCH_CHECK_VALUE(*scale_index >= 0 && *scale_index < *num_scales, op,
                      ": scale_index must be in [0, num_scales) = [0, ", *num_scales, "), got ", *scale_index);
    const double t = cfg * static_cast<double>(*scale_index) / static_cast<double>(*num_scales - 1);
    cond_w = (1 + t) / temperature;
    uncond_w = -t / temperature;
  } else if (schedule == "constant") {
    TORCH_CHECK_VALUE(
        !scale_index && !num_scales, op,
        ": scale_index and num_scales apply to schedule='var' only; the 'constant' schedule uses cfg alone");
    cond_w = cfg / temperature;
    uncond_w = (1 - cfg) / temperature;
  } else {
    TORCH_CHECK_VALUE(false, op, ": schedule must be 'var' or 'constant', got '", std::string(schedule), "'");
  }
  prm.cond_w = static_cast<float>(cond_w);
  prm.uncond_w = static_cast<float>(uncond_w);
  TORCH_CHECK_VALUE(std::isfinite(prm.cond_w) && std::isfinite(prm.uncond_w), op,
                    ": the guidance weights overflow float32 (cfg ", cfg, ", temperature ", temperature, ")");
}

inline SampleCfgLaunch prepare_sample_cfg(const at::Tensor& logits, double cfg, c10::string_view schedule,
                                          std::optional<int64_t> scale_index, std::optional<int64_t> num_scales,
                                          int64_t top_k, double top_p, double temperature, const at::Tensor& seed,
                                          const at::Tensor& offset) {
  constexpr const char* op = "fastar.sample_cfg";
  check_float_dtype(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, op, ": logits must be [2B, V] or [2B, L, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) % 2 == 0, op,
                    ": the first dimension of logits must be even (B conditional rows, then B unconditional rows), "
                    "got shape ",
                    logits.sizes());
  check_seed(op, "seed", seed, logits);
  check_seed(op, "offset", offset, logits);
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0 (0: no top-k), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1] (1: no top-p), got ", top_p);

  SampleCfgLaunch l;
  l.seed = seed;
  l.offset = offset;
  SampleCfgParams& prm = l.prm;
  prm = SampleCfgParams{};
  guidance_weights(op, schedule, cfg, scale_index, num_scales, temperature, prm);
  const bool has_positions = logits.dim() == 3;
  l.logits = unit_last_stride(has_positions ? logits : logits.unsqueeze(1));
  prm.B = l.logits.size(0) / 2;
  prm.L = l.logits.size(1);
  prm.V = l.logits.size(2);
  TORCH_CHECK_VALUE(prm.V >= 1, op, ": the vocabulary dimension of logits is empty");
  // Fixed-point sums of up to V weights of at most 2^40 must fit in uint64.
  TORCH_CHECK_VALUE(prm.V < (int64_t{1} << 23), op,
                    ": vocabularies of 2^23 tokens or more are not supported, got V=", prm.V);
  TORCH_CHECK_VALUE(prm.B * prm.L < (int64_t{1} << 31), op, ": B * L must be below 2^31, got ", prm.B * prm.L);
  prm.logits = l.logits.data_ptr();
  prm.s_row = l.logits.stride(0);
  prm.s_pos = l.logits.stride(1);
  prm.top_k = top_k < prm.V ? top_k : 0;
  // ceil(top_p * 2^64) < 2^64 for every double top_p < 1.
  prm.top_p_fixed = top_p < 1 ? static_cast<uint64_t>(std::ceil(std::ldexp(top_p, 64))) : 0;
  l.tokens = has_positions ? at::empty({prm.B, prm.L}, logits.options().dtype(at::kLong))
                           : at::empty({prm.B}, logits.options().dtype(at::kLong));
  prm.tokens = l.tokens.data_ptr<int64_t>();
  return l;
}

// The op as its schema declares it (csrc/schemas.h); Run is a backend's kernel: run_sample_cfg_cpu
// (cpu/sample_cfg.cpp) or run_sample_cfg_cuda (cuda/sample_cfg_glue.cpp).
void run_sample_cfg_cpu(SampleCfgLaunch& l);
void run_sample_cfg_cuda(SampleCfgLaunch& l);

template <void (*Run)(SampleCfgLaunch&)>
at::Tensor sample_cfg_op(const at::Tensor& logits, double cfg, c10::string_view schedule,
                         std::optional<int64_t> scale_index, std::optional<int64_t> num_scales, int64_t top_k,
                         double top_p, double temperature, const at::Tensor& seed, const at::Tensor& offset) {
  SampleCfgLaunch l =
      prepare_sample_cfg(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset);
  Run(l);
  return l.tokens;
}

inline const char* describe_sample_status(int32_t status) {
  return status == sampling::kBadValue ? "a guided logit is NaN or +inf (a NaN or inf input, or inf - inf in the mix)"
                                       : "every guided logit is -inf";
}

}  // namespace fastar
