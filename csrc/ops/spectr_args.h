// Argument checks and output allocation of fastar.spectr_accept, shared by the CPU and CUDA glue so that every
// backend rejects the same inputs with the same message.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

#include "core/spectr.h"
#include "ops/acceptance_args.h"
#include "ops/common.h"

namespace fastar {

struct SpectrLaunch {
  at::Tensor ids, draft_probs, target_probs, draft_index, tokens, num_accepted, seed, offset;
  SpectrParams prm;
};

inline SpectrLaunch prepare_spectr_accept(const at::Tensor& draft_token_ids, const at::Tensor& draft_probs,
                                          const at::Tensor& target_probs, const at::Tensor& seed,
                                          const at::Tensor& offset) {
  const char* op = "fastar.spectr_accept";
  check_token_ids(op, "draft_token_ids", draft_token_ids, 3);
  check_float_dtype(op, "draft_probs", draft_probs);
  check_float_dtype(op, "target_probs", target_probs);
  TORCH_CHECK_VALUE(draft_probs.dim() == 4, op, ": draft_probs must be 4-D [B, k, n, V], got shape ",
                    draft_probs.sizes());
  TORCH_CHECK_VALUE(target_probs.dim() == 4, op, ": target_probs must be 4-D [B, k, n+1, V], got shape ",
                    target_probs.sizes());
  TORCH_CHECK_TYPE(draft_probs.scalar_type() == target_probs.scalar_type(), op,
                   ": draft_probs and target_probs must have the same dtype, got ", draft_probs.scalar_type(), " and ",
                   target_probs.scalar_type());
  check_same_device(op, "draft_token_ids", draft_token_ids, target_probs);
  check_same_device(op, "draft_probs", draft_probs, target_probs);
  const int64_t B = draft_token_ids.size(0), K = draft_token_ids.size(1), n = draft_token_ids.size(2);
  const int64_t V = target_probs.size(3);
  TORCH_CHECK_VALUE(K >= 1 && K <= spectr::kMaxDrafts, op, ": the number of drafts k must lie in [1, ",
                    spectr::kMaxDrafts, "], got draft_token_ids of shape ", draft_token_ids.sizes());
  TORCH_CHECK_VALUE(target_probs.size(0) == B && target_probs.size(1) == K && target_probs.size(2) == n + 1, op,
                    ": target_probs must have shape [B, k, n+1, V] = [", B, ", ", K, ", ", n + 1,
                    ", V] for draft_token_ids of shape ", draft_token_ids.sizes(), ", got ", target_probs.sizes());
  TORCH_CHECK_VALUE(
      draft_probs.size(0) == B && draft_probs.size(1) == K && draft_probs.size(2) == n && draft_probs.size(3) == V, op,
      ": draft_probs must have shape [B, k, n, V] = [", B, ", ", K, ", ", n, ", ", V, "], got ", draft_probs.sizes());
  TORCH_CHECK_VALUE(V >= 1, op, ": the vocabulary dimension of target_probs is empty");
  // Fixed-point sums of up to V weights of at most 2^40 must fit in uint64.
  TORCH_CHECK_VALUE(V < (int64_t{1} << 23), op, ": vocabularies of 2^23 tokens or more are not supported, got V=", V);
  TORCH_CHECK_VALUE(B < (int64_t{1} << 31) && (n + 1) * K < (int64_t{1} << 31), op,
                    ": batch or draft length too large");
  check_seed(op, "seed", seed, target_probs);
  check_seed(op, "offset", offset, target_probs);

  SpectrLaunch l;
  l.seed = seed;
  l.offset = offset;
  l.ids = draft_token_ids.contiguous();
  l.draft_probs = unit_last_stride(draft_probs);
  l.target_probs = unit_last_stride(target_probs);
  auto opts = l.target_probs.options().dtype(at::kInt);
  l.draft_index = at::empty({B}, opts);
  l.tokens = at::empty({B, n + 1}, opts);
  l.num_accepted = at::empty({B}, opts);
  SpectrParams& prm = l.prm;
  prm = SpectrParams{};
  prm.draft_ids = l.ids.data_ptr();
  prm.ids64 = l.ids.scalar_type() == at::kLong;
  prm.ids_sb = K * n;
  prm.ids_sk = n;
  prm.draft_probs = l.draft_probs.data_ptr();
  prm.dp_sb = l.draft_probs.stride(0);
  prm.dp_sk = l.draft_probs.stride(1);
  prm.dp_sn = l.draft_probs.stride(2);
  prm.target_probs = l.target_probs.data_ptr();
  prm.tp_sb = l.target_probs.stride(0);
  prm.tp_sk = l.target_probs.stride(1);
  prm.tp_sn = l.target_probs.stride(2);
  prm.draft_index = l.draft_index.data_ptr<int32_t>();
  prm.tokens = l.tokens.data_ptr<int32_t>();
  prm.num_accepted = l.num_accepted.data_ptr<int32_t>();
  prm.B = B;
  prm.K = K;
  prm.n = n;
  prm.V = V;
  return l;
}

void run_spectr_accept_cpu(SpectrLaunch& l);
void run_spectr_accept_cuda(SpectrLaunch& l);

template <void (*Run)(SpectrLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> spectr_accept_op(const at::Tensor& draft_token_ids,
                                                                const at::Tensor& draft_probs,
                                                                const at::Tensor& target_probs, const at::Tensor& seed,
                                                                const at::Tensor& offset) {
  SpectrLaunch l = prepare_spectr_accept(draft_token_ids, draft_probs, target_probs, seed, offset);
  Run(l);
  return {l.draft_index, l.tokens, l.num_accepted};
}

}  // namespace fastar
