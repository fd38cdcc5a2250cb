// Argument checks and output allocation of fastar.diffusion_unmask, shared by the CPU and CUDA glue so that
// every backend rejects the same inputs with the same message.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "core/diffusion.h"
#include "ops/common.h"

namespace fastar {

struct DiffusionUnmaskLaunch {
  at::Tensor logits, x, num_transfer, seed, offset;
  at::Tensor candidates, confidence, remaining, status;
  DiffusionUnmaskParams prm;
};

inline int32_t parse_confidence(const char* op, c10::string_view name) {
  if (name == "probability") return diffusion::kProbability;
  if (name == "margin") return diffusion::kMargin;
  if (name == "neg_entropy") return diffusion::kNegEntropy;
  if (name == "random") return diffusion::kRandom;
  if (name == "log_probability") return diffusion::kLogProbability;
  TORCH_CHECK_VALUE(false, op,
                    ": confidence must be 'probability', 'log_probability', 'margin', 'neg_entropy' or 'random', got '",
                    std::string(name), "'");
}

inline int32_t parse_rule(const char* op, c10::string_view name) {
  if (name == "topk") return diffusion::kTopK;
  if (name == "threshold") return diffusion::kThreshold;
  if (name == "factor") return diffusion::kFactor;
  if (name == "dinfer") return diffusion::kDInfer;
  if (name == "dimple") return diffusion::kDimple;
  if (name == "sdar") return diffusion::kSdar;
  TORCH_CHECK_VALUE(false, op, ": rule must be 'topk', 'threshold', 'factor', 'dinfer', 'dimple' or 'sdar', got '",
                    std::string(name), "'");
}

inline DiffusionUnmaskLaunch prepare_diffusion_unmask(
    const at::Tensor& logits, const at::Tensor& x, const std::optional<at::Tensor>& num_transfer, int64_t mask_id,
    int64_t block_start, int64_t block_end, c10::string_view confidence, c10::string_view rule, double threshold,
    double factor, double temperature, double confidence_noise, double top_p, int64_t top_k,
    c10::string_view confidence_source, const at::Tensor& seed, const at::Tensor& offset) {
  constexpr const char* op = "fastar.diffusion_unmask";
  check_float_dtype(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be [B, L, V], got shape ", logits.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, op, ": x must be int64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1), op,
                    ": x must be [B, L] for logits [B, L, V], got x ", x.sizes(), " and logits ", logits.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (it is written in place)");
  check_same_device(op, "x", x, logits);
  check_seed(op, "seed", seed, logits);
  check_seed(op, "offset", offset, logits);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK_VALUE(V >= 1, op, ": the vocabulary dimension of logits is empty");
  // Fixed-point sums of up to V weights of at most 2^40 must fit in uint64.
  TORCH_CHECK_VALUE(V < (int64_t{1} << 23), op, ": vocabularies of 2^23 tokens or more are not supported, got V=", V);
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < V, op, ": mask_id must be a token of the vocabulary [0, ", V, "), got ",
                    mask_id);
  TORCH_CHECK_VALUE(0 <= block_start && block_start < block_end && block_end <= L, op,
                    ": the block [block_start, block_end) must satisfy 0 <= block_start < block_end <= L = ", L,
                    ", got [", block_start, ", ", block_end, ")");
  TORCH_CHECK_VALUE(B * (block_end - block_start) < (int64_t{1} << 31), op, ": B * block length must be below 2^31");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, op,
                    ": temperature must be finite and >= 0 (0: the argmax), got ", temperature);

  DiffusionUnmaskLaunch l;
  DiffusionUnmaskParams& prm = l.prm;
  prm = DiffusionUnmaskParams{};
  prm.confidence_kind = parse_confidence(op, confidence);
  prm.rule = parse_rule(op, rule);
  const bool counts = prm.rule == diffusion::kTopK || prm.rule == diffusion::kDimple || prm.rule == diffusion::kSdar;
  if (counts) {
    TORCH_CHECK_VALUE(num_transfer.has_value(), op, ": rule='", std::string(rule), "' needs num_transfer (int64 [B])");
    const at::Tensor& k = *num_transfer;
    TORCH_CHECK_TYPE(k.scalar_type() == at::kLong, op, ": num_transfer must be int64, got ", k.scalar_type());
    TORCH_CHECK_VALUE(k.dim() == 1 && k.size(0) == B, op, ": num_transfer must be [B] = [", B, "], got ", k.sizes());
    check_same_device(op, "num_transfer", k, logits);
    l.num_transfer = k.contiguous();
    prm.num_transfer = l.num_transfer.data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(!num_transfer.has_value(), op, ": num_transfer applies to rule='topk', 'dimple' and 'sdar' only");
  }
  const bool thresholded = prm.rule == diffusion::kThreshold || prm.rule == diffusion::kDInfer ||
                           prm.rule == diffusion::kDimple || prm.rule == diffusion::kSdar;
  TORCH_CHECK_VALUE(!thresholded || std::isfinite(threshold), op, ": threshold must be finite, got ", threshold);
  TORCH_CHECK_VALUE(std::isfinite(confidence_noise) && confidence_noise >= 0, op,
                    ": confidence_noise must be finite and >= 0, got ", confidence_noise);
  TORCH_CHECK_VALUE(confidence_noise == 0 || prm.confidence_kind != diffusion::kRandom, op,
                    ": confidence_noise does not apply to confidence='random'");
  TORCH_CHECK_VALUE(prm.rule != diffusion::kFactor || (std::isfinite(factor) && factor > 0), op,
                    ": factor must be finite and > 0, got ", factor);
  const float inv_t = temperature > 0 ? static_cast<float>(1.0 / temperature) : 0.0f;
  TORCH_CHECK_VALUE(std::isfinite(inv_t), op, ": 1 / temperature overflows float32 (temperature ", temperature, ")");
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1] (1: no nucleus), got ", top_p);
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0 (0: no top-k), got ", top_k);
  TORCH_CHECK_VALUE(confidence_source == "logits" || confidence_source == "sampling", op,
                    ": confidence_source must be 'logits' or 'sampling', got '", std::string(confidence_source), "'");
  // ceil(top_p * 2^64) < 2^64 for every double top_p < 1.
  prm.top_p_fixed = top_p < 1 ? static_cast<uint64_t>(std::ceil(std::ldexp(top_p, 64))) : 0;
  prm.top_k = top_k < V ? top_k : 0;
  prm.filter_beta = inv_t > 0 ? inv_t : 1.0f;
  prm.conf_filtered = confidence_source == "sampling";
  prm.conf_beta = prm.conf_filtered ? prm.filter_beta : 1.0f;

  l.logits = unit_last_stride(logits);
  l.x = x;
  l.seed = seed;
  l.offset = offset;
  const int64_t Lb = block_end - block_start;
  l.candidates = at::empty({B, Lb}, logits.options().dtype(at::kLong));
  l.confidence = at::empty({B, Lb}, logits.options().dtype(at::kFloat));
  l.remaining = at::empty({B}, logits.options().dtype(at::kLong));
  l.status = at::empty({B, Lb}, logits.options().dtype(at::kInt));
  prm.logits = l.logits.data_ptr();
  prm.s_row = l.logits.stride(0);
  prm.s_pos = l.logits.stride(1);
  prm.x = x.data_ptr<int64_t>();
  prm.candidates = l.candidates.data_ptr<int64_t>();
  prm.confidence = l.confidence.data_ptr<float>();
  prm.remaining = l.remaining.data_ptr<int64_t>();
  prm.status = l.status.data_ptr<int32_t>();
  prm.B = B;
  prm.L = L;
  prm.V = V;
  prm.block_start = block_start;
  prm.block_len = Lb;
  prm.mask_id = mask_id;
  prm.inv_temperature = inv_t;
  prm.threshold = threshold;
  prm.factor = factor;
  prm.confidence_noise = confidence_noise;
  return l;
}

// The op as its schema declares it (csrc/schemas.h); Run is a backend's kernel: run_diffusion_unmask_cpu
// (cpu/diffusion_unmask.cpp) or run_diffusion_unmask_cuda (cuda/diffusion_unmask_glue.cpp).
void run_diffusion_unmask_cpu(DiffusionUnmaskLaunch& l);
void run_diffusion_unmask_cuda(DiffusionUnmaskLaunch& l);

template <void (*Run)(DiffusionUnmaskLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_unmask_op(
    const at::Tensor& logits, at::Tensor& x, const std::optional<at::Tensor>& num_transfer, int64_t mask_id,
    int64_t block_start, int64_t block_end, c10::string_view confidence, c10::string_view rule, double threshold,
    double factor, double temperature, double confidence_noise, double top_p, int64_t top_k,
    c10::string_view confidence_source, const at::Tensor& seed, const at::Tensor& offset) {
  DiffusionUnmaskLaunch l =
      prepare_diffusion_unmask(logits, x, num_transfer, mask_id, block_start, block_end, confidence, rule, threshold,
                               factor, temperature, confidence_noise, top_p, top_k, confidence_source, seed, offset);
  Run(l);
  return {l.candidates, l.confidence, l.remaining};
}

}  // namespace fastar
