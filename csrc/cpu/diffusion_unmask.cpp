// fastar.diffusion_unmask on the CPU (ops/diffusion_unmask_args.h): the scoring kernel of the active ISA
// (cpu/kernels/diffusion_unmask.cpp), then the selection row by row. Invalid positions and counts raise
// before x is written.
#include <vector>

#include "cpu/kernels/diffusion_unmask.h"
#include "ops/diffusion_unmask_args.h"

namespace fastar {

namespace {

const char* describe(int32_t status) {
  return status == diffusion::kBadValue ? "a logit is NaN or +inf" : "every logit is -inf";
}

// Commits the selected candidates of row b into x and returns how many block positions hold mask_id after it (a
// committed candidate may be mask_id itself).
int64_t select_row(const DiffusionUnmaskParams& prm, int64_t b, std::vector<float>& sorted) {
  using namespace diffusion;
  const int64_t Lb = prm.block_len;
  const int64_t* cand = prm.candidates + b * Lb;
  const float* conf = prm.confidence + b * Lb;
  std::vector<int64_t> rank(static_cast<size_t>(Lb), -1);
  int64_t n = 0;
  sorted.assign(static_cast<size_t>(Lb), 0.0f);
  for (int64_t j = 0; j < Lb; ++j) {
    if (cand[j] < 0) continue;
    ++n;
    int64_t r = 0;
    for (int64_t k = 0; k < Lb; ++k) r += cand[k] >= 0 && ahead(conf[k], k, conf[j], j);
    rank[j] = r;
    sorted[r] = conf[j];
  }
  const int64_t quota =
      rank_quota(prm.rule, n, prm.num_transfer ? prm.num_transfer[b] : 0, sorted.data(), prm.threshold, prm.factor);
  int64_t committed = 0;
  for (int64_t j = 0; j < Lb; ++j) {
    if (rank[j] >= 0 && rank[j] < quota) {
      prm.x[b * prm.L + prm.block_start + j] = cand[j];
      committed += cand[j] != prm.mask_id;
    }
  }
  return n - committed;
}

}  // namespace

void run_diffusion_unmask_cpu(DiffusionUnmaskLaunch& l) {
  constexpr const char* op = "fastar.diffusion_unmask";
  DiffusionUnmaskParams& prm = l.prm;
  TORCH_CHECK_VALUE(l.logits.is_cpu(), op, ": expected CPU tensors");
  prm.seed = PhiloxSeed{static_cast<uint64_t>(l.seed.item<int64_t>()), static_cast<uint64_t>(l.offset.item<int64_t>()),
                        nullptr, nullptr};
  for (int64_t b = 0; prm.num_transfer && b < prm.B; ++b) {
    TORCH_CHECK_VALUE(prm.num_transfer[b] >= 0, op, ": num_transfer must be >= 0, got ", prm.num_transfer[b],
                      " at batch row ", b);
  }
  FASTAR_CPU_DISPATCH(diffusion_scores, prm, float_kind(l.logits));
  for (int64_t i = 0; i < prm.B * prm.block_len; ++i) {
    TORCH_CHECK_VALUE(prm.status[i] == diffusion::kOk, op, ": invalid logits at batch row ", i / prm.block_len,
                      ", position ", prm.block_start + i % prm.block_len, ": ", describe(prm.status[i]));
  }
  std::vector<float> sorted;
  for (int64_t b = 0; b < prm.B; ++b) prm.remaining[b] = select_row(prm, b, sorted);
}

}  // namespace fastar
