// Argument checks and output allocation of the acceptance ops, shared by the CPU and CUDA glue so that
// every backend rejects the same inputs with the same message.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "core/acceptance.h"
#include "core/lantern.h"
#include "core/tree_acceptance.h"
#include "ops/common.h"

namespace fastar {

struct AcceptanceShapes {
  int64_t B, n, V;
};

inline void check_token_ids(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  check_float_dtype(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be 3-D [B, positions, V], got shape ", t.sizes());
}

// Shared by both ops: draft ids [B, n], the per-position rows [B, n+1, V], optional ragged lengths [B].
inline AcceptanceShapes check_acceptance_args(const char* op, const at::Tensor& ids, const at::Tensor& rows,
                                              const char* rows_name, const std::optional<at::Tensor>& num_draft) {
  check_token_ids(op, "draft_token_ids", ids, 2);
  check_float(op, rows_name, rows);
  check_same_device(op, "draft_token_ids", ids, rows);
  const int64_t B = ids.size(0), n = ids.size(1), V = rows.size(2);
  TORCH_CHECK_VALUE(rows.size(0) == B && rows.size(1) == n + 1, op, ": ", rows_name, " must have shape [B, n+1, V] = [",
                    B, ", ", n + 1, ", V] for draft_token_ids of shape ", ids.sizes(), ", got ", rows.sizes());
  TORCH_CHECK_VALUE(V >= 1, op, ": the vocabulary dimension of ", rows_name, " is empty");
  // Fixed-point sums of up to V weights of at most 2^40 must fit in uint64.
  TORCH_CHECK_VALUE(V < (int64_t{1} << 23), op, ": vocabularies of 2^23 tokens or more are not supported, got V=", V);
  TORCH_CHECK_VALUE(B < (int64_t{1} << 31) && n < (int64_t{1} << 30), op, ": batch or draft length too large");
  if (num_draft) {
    check_token_ids(op, "num_draft_tokens", *num_draft, 1);
    TORCH_CHECK_VALUE(num_draft->size(0) == B, op, ": num_draft_tokens must have shape [B] = [", B, "], got ",
                      num_draft->sizes());
    check_same_device(op, "num_draft_tokens", *num_draft, rows);
  }
  return {B, n, V};
}

inline AcceptanceShapes check_speculative_sample_args(
    const at::Tensor& ids, const std::optional<at::Tensor>& draft_probs, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& num_draft, const at::Tensor& seed, const at::Tensor& offset, const char* op) {
  const AcceptanceShapes s = check_acceptance_args(op, ids, target_probs, "target_probs", num_draft);
  if (draft_probs) {
    check_float(op, "draft_probs", *draft_probs);
    TORCH_CHECK_TYPE(draft_probs->scalar_type() == target_probs.scalar_type(), op,
                     ": draft_probs and target_probs must have the same dtype, got ", draft_probs->scalar_type(),
                     " and ", target_probs.scalar_type());
    TORCH_CHECK_VALUE(draft_probs->size(0) == s.B && draft_probs->size(1) == s.n && draft_probs->size(2) == s.V, op,
                      ": draft_probs must have shape [B, n, V] = [", s.B, ", ", s.n, ", ", s.V, "], got ",
                      draft_probs->sizes());
    check_same_device(op, "draft_probs", *draft_probs, target_probs);
  }
  check_seed(op, "seed", seed, target_probs);
  check_seed(op, "offset", offset, target_probs);
  return s;
}

inline std::tuple<at::Tensor, at::Tensor> allocate_acceptance_outputs(const at::Tensor& like, int64_t B, int64_t n) {
  auto opts = like.options().dtype(at::kInt);
  return {at::empty({B, n + 1}, opts), at::empty({B}, opts)};
}

// The arguments both acceptance ops share: draft ids, ragged lengths, outputs and sizes.
template <typename Params>
void fill_row_args(Params& prm, const at::Tensor& ids, const std::optional<at::Tensor>& num_draft, at::Tensor& tokens,
                   at::Tensor& num_accepted, const AcceptanceShapes& s) {
  prm.draft_ids = ids.data_ptr();
  prm.ids64 = ids.scalar_type() == at::kLong;
  prm.ids_sb = s.n;
  prm.num_draft = num_draft ? num_draft->data_ptr() : nullptr;
  prm.nd64 = num_draft && num_draft->scalar_type() == at::kLong;
  prm.tokens = tokens.data_ptr<int32_t>();
  prm.num_accepted = num_accepted.data_ptr<int32_t>();
  prm.B = s.B;
  prm.n = s.n;
  prm.V = s.V;
}

// Checked inputs with unit stride along V, the allocated outputs, and the kernel arguments over them
// (the caller fills in the seed: a value on the CPU, possibly a device pointer on CUDA).
struct SpeculativeSampleLaunch {
  at::Tensor ids, target_probs, tokens, num_accepted, seed, offset, neighbors, embeddings;
  std::optional<at::Tensor> draft_probs, num_draft;
  ChainAcceptParams prm;
  const char* op;  // the op's name in error messages
};

inline SpeculativeSampleLaunch prepare_speculative_sample(const at::Tensor& draft_token_ids,
                                                          const std::optional<at::Tensor>& draft_probs,
                                                          const at::Tensor& target_probs,
                                                          const std::optional<at::Tensor>& num_draft_tokens,
                                                          const at::Tensor& seed, const at::Tensor& offset,
                                                          const char* op = "fastar.speculative_sample") {
  const AcceptanceShapes s =
      check_speculative_sample_args(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, op);
  SpeculativeSampleLaunch l;
  l.op = op;
  l.seed = seed;
  l.offset = offset;
  l.ids = draft_token_ids.contiguous();
  l.target_probs = unit_last_stride(target_probs);
  if (draft_probs) l.draft_probs = unit_last_stride(*draft_probs);
  if (num_draft_tokens) l.num_draft = num_draft_tokens->contiguous();
  std::tie(l.tokens, l.num_accepted) = allocate_acceptance_outputs(l.target_probs, s.B, s.n);
  ChainAcceptParams& prm = l.prm;
  prm = ChainAcceptParams{};
  fill_row_args(prm, l.ids, l.num_draft, l.tokens, l.num_accepted, s);
  prm.draft_probs = l.draft_probs ? l.draft_probs->data_ptr() : nullptr;
  prm.dp_sb = l.draft_probs ? l.draft_probs->stride(0) : 0;
  prm.dp_sn = l.draft_probs ? l.draft_probs->stride(1) : 0;
  prm.target_probs = l.target_probs.data_ptr();
  prm.tp_sb = l.target_probs.stride(0);
  prm.tp_sn = l.target_probs.stride(1);
  return l;
}

struct GreedyVerifyLaunch {
  at::Tensor ids, target_logits, tokens, num_accepted;
  std::optional<at::Tensor> num_draft;
  GreedyVerifyParams prm;
};

inline GreedyVerifyLaunch prepare_greedy_verify(const at::Tensor& draft_token_ids, const at::Tensor& target_logits,
                                                const std::optional<at::Tensor>& num_draft_tokens) {
  const AcceptanceShapes s =
      check_acceptance_args("fastar.greedy_verify", draft_token_ids, target_logits, "target_logits", num_draft_tokens);
  GreedyVerifyLaunch l;
  l.ids = draft_token_ids.contiguous();
  l.target_logits = unit_last_stride(target_logits);
  if (num_draft_tokens) l.num_draft = num_draft_tokens->contiguous();
  std::tie(l.tokens, l.num_accepted) = allocate_acceptance_outputs(l.target_logits, s.B, s.n);
  GreedyVerifyParams& prm = l.prm;
  prm = GreedyVerifyParams{};
  fill_row_args(prm, l.ids, l.num_draft, l.tokens, l.num_accepted, s);
  prm.target_logits = l.target_logits.data_ptr();
  prm.tl_sb = l.target_logits.stride(0);
  prm.tl_sn = l.target_logits.stride(1);
  return l;
}

// The tree ops: drafts [B, N] on the tree `parents` [B or 1, N], per-node rows [B, N+1, V] (probabilities, or
// tree_greedy_verify's logits); outputs path and tokens [B, max_depth + 1] and num_accepted [B].
struct TreeSampleLaunch {
  at::Tensor ids, parents, target_probs, path, tokens, num_accepted, seed, offset;
  std::optional<at::Tensor> draft_probs;
  TreeSampleParams prm;
};

inline TreeSampleLaunch prepare_tree_launch(const char* op, const at::Tensor& draft_token_ids,
                                            const at::Tensor& parents, const std::optional<at::Tensor>& draft_probs,
                                            const at::Tensor& rows, const char* rows_name, int64_t max_depth,
                                            bool root_in_path) {
  const AcceptanceShapes s = check_acceptance_args(op, draft_token_ids, rows, rows_name, std::nullopt);
  check_token_ids(op, "parents", parents, 2);
  check_same_device(op, "parents", parents, rows);
  TORCH_CHECK_VALUE((parents.size(0) == s.B || parents.size(0) == 1) && parents.size(1) == s.n, op,
                    ": parents must have shape [B or 1, N] = [", s.B, " or 1, ", s.n, "] for draft_token_ids of shape ",
                    draft_token_ids.sizes(), ", got ", parents.sizes());
  TORCH_CHECK_VALUE(max_depth >= (s.n > 0 ? 1 : 0) && max_depth <= s.n, op, ": max_depth must lie in [",
                    s.n > 0 ? 1 : 0, ", N = ", s.n, "], got ", max_depth);
  if (draft_probs) {
    check_float(op, "draft_probs", *draft_probs);
    TORCH_CHECK_TYPE(draft_probs->scalar_type() == rows.scalar_type(), op, ": draft_probs and ", rows_name,
                     " must have the same dtype, got ", draft_probs->scalar_type(), " and ", rows.scalar_type());
    TORCH_CHECK_VALUE(draft_probs->size(0) == s.B && draft_probs->size(1) == s.n && draft_probs->size(2) == s.V, op,
                      ": draft_probs must have shape [B, N, V] = [", s.B, ", ", s.n, ", ", s.V, "], got ",
                      draft_probs->sizes());
    check_same_device(op, "draft_probs", *draft_probs, rows);
  }
  TreeSampleLaunch l;
  l.ids = draft_token_ids.contiguous();
  l.parents = parents.contiguous();
  l.target_probs = unit_last_stride(rows);
  if (draft_probs) l.draft_probs = unit_last_stride(*draft_probs);
  auto opts = l.target_probs.options().dtype(at::kInt);
  l.path = at::empty({s.B, max_depth + 1}, opts);
  l.tokens = at::empty({s.B, max_depth + 1}, opts);
  l.num_accepted = at::empty({s.B}, opts);
  TreeSampleParams& prm = l.prm;
  prm = TreeSampleParams{};
  prm.draft_ids = l.ids.data_ptr();
  prm.ids64 = l.ids.scalar_type() == at::kLong;
  prm.ids_sb = s.n;
  prm.parents = l.parents.data_ptr();
  prm.par64 = l.parents.scalar_type() == at::kLong;
  prm.par_sb = l.parents.size(0) == 1 ? 0 : s.n;
  prm.draft_probs = l.draft_probs ? l.draft_probs->data_ptr() : nullptr;
  prm.dp_sb = l.draft_probs ? l.draft_probs->stride(0) : 0;
  prm.dp_sn = l.draft_probs ? l.draft_probs->stride(1) : 0;
  prm.target_probs = l.target_probs.data_ptr();
  prm.tp_sb = l.target_probs.stride(0);
  prm.tp_sn = l.target_probs.stride(1);
  prm.path = l.path.data_ptr<int32_t>();
  prm.tokens = l.tokens.data_ptr<int32_t>();
  prm.num_accepted = l.num_accepted.data_ptr<int32_t>();
  prm.B = s.B;
  prm.N = s.n;
  prm.V = s.V;
  prm.max_depth = max_depth;
  prm.root_in_path = root_in_path;
  return l;
}

// The ops as their schemas declare them (csrc/schemas.h); Run is a backend's kernel: run_<op>_cpu
// (cpu/<op>.cpp) or run_<op>_cuda (cuda/<op>_glue.cpp).
void run_speculative_sample_cpu(SpeculativeSampleLaunch& l);
void run_speculative_sample_cuda(SpeculativeSampleLaunch& l);
void run_greedy_verify_cpu(GreedyVerifyLaunch& l);
void run_greedy_verify_cuda(GreedyVerifyLaunch& l);
void run_tree_speculative_sample_cpu(TreeSampleLaunch& l);
void run_tree_speculative_sample_cuda(TreeSampleLaunch& l);
void run_tree_greedy_verify_cpu(TreeSampleLaunch& l);
void run_tree_greedy_verify_cuda(TreeSampleLaunch& l);
void run_typical_accept_cpu(TreeSampleLaunch& l);
void run_typical_accept_cuda(TreeSampleLaunch& l);

template <void (*Run)(SpeculativeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor> speculative_sample_op(const at::Tensor& draft_token_ids,
                                                         const std::optional<at::Tensor>& draft_probs,
                                                         const at::Tensor& target_probs,
                                                         const std::optional<at::Tensor>& num_draft_tokens,
                                                         const at::Tensor& seed, const at::Tensor& offset) {
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset);
  Run(l);
  return {l.tokens, l.num_accepted};
}

// LANTERN's relaxed test on the chain op's kernels: neighbors int [V, k] (k >= 1), delta in [0, 1].
template <void (*Run)(SpeculativeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor> lantern_accept_op(const at::Tensor& draft_token_ids,
                                                     const std::optional<at::Tensor>& draft_probs,
                                                     const at::Tensor& target_probs, const at::Tensor& neighbors,
                                                     double delta, const std::optional<at::Tensor>& num_draft_tokens,
                                                     const at::Tensor& seed, const at::Tensor& offset) {
  constexpr const char* op = "fastar.lantern_accept";
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, op);
  check_token_ids(op, "neighbors", neighbors, 2);
  check_same_device(op, "neighbors", neighbors, target_probs);
  TORCH_CHECK_VALUE(neighbors.size(0) == l.prm.V && neighbors.size(1) >= 1 && neighbors.size(1) <= (1 << 20), op,
                    ": neighbors must have shape [V, k] = [", l.prm.V, ", k] with 1 <= k <= 2^20, got ",
                    neighbors.sizes());
  TORCH_CHECK_VALUE(std::isfinite(delta) && delta >= 0 && delta <= 1, op, ": delta must lie in [0, 1], got ", delta);
  l.neighbors = neighbors.contiguous();
  l.prm.neighbors = l.neighbors.data_ptr();
  l.prm.nb64 = l.neighbors.scalar_type() == at::kLong;
  l.prm.nb_k = l.neighbors.size(1);
  l.prm.delta_fixed = static_cast<uint64_t>(std::nearbyint(delta * accept::kFixedScale));
  Run(l);
  return {l.tokens, l.num_accepted};
}

// GSD's grouped test on the chain op's kernels: embeddings float32 [V, d], group_above / group_below ranking
// neighbours in [0, kGsdMaxSide], thresholds >= 0 (inf: no filter).
template <void (*Run)(SpeculativeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor> gsd_accept_op(const at::Tensor& draft_token_ids,
                                                 const std::optional<at::Tensor>& draft_probs,
                                                 const at::Tensor& target_probs, const at::Tensor& embeddings,
                                                 int64_t group_above, int64_t group_below, double prob_threshold,
                                                 double dist_threshold,
                                                 const std::optional<at::Tensor>& num_draft_tokens,
                                                 const at::Tensor& seed, const at::Tensor& offset) {
  constexpr const char* op = "fastar.gsd_accept";
  SpeculativeSampleLaunch l =
      prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, op);
  TORCH_CHECK_TYPE(embeddings.scalar_type() == at::kFloat, op, ": embeddings must be float32, got ",
                   embeddings.scalar_type());
  check_same_device(op, "embeddings", embeddings, target_probs);
  TORCH_CHECK_VALUE(embeddings.dim() == 2 && embeddings.size(0) == l.prm.V && embeddings.size(1) >= 1, op,
                    ": embeddings must have shape [V, d] = [", l.prm.V, ", d] with d >= 1, got ", embeddings.sizes());
  TORCH_CHECK_VALUE(group_above >= 0 && group_above <= kGsdMaxSide && group_below >= 0 && group_below <= kGsdMaxSide,
                    op, ": group_above and group_below must lie in [0, ", kGsdMaxSide, "], got ", group_above, " and ",
                    group_below);
  TORCH_CHECK_VALUE(prob_threshold >= 0 && dist_threshold >= 0, op,
                    ": prob_threshold and dist_threshold must be >= 0, got ", prob_threshold, " and ", dist_threshold);
  l.embeddings = embeddings.contiguous();
  l.prm.embeddings = l.embeddings.data_ptr<float>();
  l.prm.emb_d = l.embeddings.size(1);
  l.prm.gsd_above = static_cast<int32_t>(group_above);
  l.prm.gsd_below = static_cast<int32_t>(group_below);
  l.prm.gsd_prob_tol = prob_threshold;
  l.prm.gsd_dist_tol = static_cast<float>(dist_threshold);
  Run(l);
  return {l.tokens, l.num_accepted};
}

// SJD: the chain op's exact test plus the refresh of the positions after a rejection; next_drafts int32 [B, n]
// (-1 padded) and next_probs float32 [B, n] (0 padded).
template <void (*Run)(SpeculativeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sjd_accept_op(
    const at::Tensor& draft_token_ids, const std::optional<at::Tensor>& draft_probs, const at::Tensor& target_probs,
    const std::optional<at::Tensor>& num_draft_tokens, const at::Tensor& seed, const at::Tensor& offset) {
  SpeculativeSampleLaunch l = prepare_speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens,
                                                         seed, offset, "fastar.sjd_accept");
  at::Tensor next_drafts = at::empty({l.prm.B, l.prm.n}, l.tokens.options());
  at::Tensor next_probs = at::empty({l.prm.B, l.prm.n}, l.tokens.options().dtype(at::kFloat));
  l.prm.next_drafts = next_drafts.data_ptr<int32_t>();
  l.prm.next_probs = next_probs.data_ptr<float>();
  Run(l);
  return {l.tokens, l.num_accepted, next_drafts, next_probs};
}

template <void (*Run)(GreedyVerifyLaunch&)>
std::tuple<at::Tensor, at::Tensor> greedy_verify_op(const at::Tensor& draft_token_ids, const at::Tensor& target_logits,
                                                    const std::optional<at::Tensor>& num_draft_tokens) {
  GreedyVerifyLaunch l = prepare_greedy_verify(draft_token_ids, target_logits, num_draft_tokens);
  Run(l);
  return {l.tokens, l.num_accepted};
}

template <void (*Run)(TreeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_speculative_sample_op(
    const at::Tensor& draft_token_ids, const at::Tensor& parents, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& target_probs, int64_t max_depth, bool root_in_path, const at::Tensor& seed,
    const at::Tensor& offset) {
  constexpr const char* op = "fastar.tree_speculative_sample";
  TreeSampleLaunch l = prepare_tree_launch(op, draft_token_ids, parents, draft_probs, target_probs, "target_probs",
                                           max_depth, root_in_path);
  check_seed(op, "seed", seed, target_probs);
  check_seed(op, "offset", offset, target_probs);
  l.seed = seed;
  l.offset = offset;
  Run(l);
  return {l.path, l.tokens, l.num_accepted};
}

template <void (*Run)(TreeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_greedy_verify_op(const at::Tensor& draft_token_ids,
                                                                     const at::Tensor& parents,
                                                                     const at::Tensor& target_logits, int64_t max_depth,
                                                                     bool root_in_path) {
  TreeSampleLaunch l = prepare_tree_launch("fastar.tree_greedy_verify", draft_token_ids, parents, std::nullopt,
                                           target_logits, "target_logits", max_depth, root_in_path);
  Run(l);
  return {l.path, l.tokens, l.num_accepted};
}

template <void (*Run)(TreeSampleLaunch&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> typical_accept_op(const at::Tensor& draft_token_ids,
                                                                 const at::Tensor& parents,
                                                                 const at::Tensor& target_logits, int64_t max_depth,
                                                                 bool root_in_path, double posterior_threshold,
                                                                 double posterior_alpha, double temperature) {
  constexpr const char* op = "fastar.typical_accept";
  TORCH_CHECK_VALUE(std::isfinite(posterior_threshold) && posterior_threshold >= 0 && std::isfinite(posterior_alpha) &&
                        posterior_alpha >= 0,
                    op, ": posterior_threshold and posterior_alpha must be finite and >= 0, got ", posterior_threshold,
                    " and ", posterior_alpha);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, op, ": temperature must be finite and >= 0, got ",
                    temperature);
  TreeSampleLaunch l = prepare_tree_launch(op, draft_token_ids, parents, std::nullopt, target_logits, "target_logits",
                                           max_depth, root_in_path);
  l.prm.posterior_threshold = static_cast<float>(posterior_threshold);
  l.prm.posterior_alpha = static_cast<float>(posterior_alpha);
  l.prm.temperature = static_cast<float>(temperature);
  l.prm.inv_temperature = l.prm.temperature > 0.0f ? 1.0f / l.prm.temperature : 0.0f;
  Run(l);
  return {l.path, l.tokens, l.num_accepted};
}

// CPU kernels report per-row statuses; raise for the first bad row (no device sync involved on the CPU).
inline void raise_on_bad_rows(const char* op, const int32_t* num_accepted, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    if (num_accepted[b] < 0) {
      const int32_t status = -num_accepted[b];
      const std::string msg = std::string(op) + ": invalid input in batch row " + std::to_string(b) + ": " +
                              accept::describe_status(status);
      if (status & accept::kBadTokenId) TORCH_CHECK_INDEX(false, msg);
      TORCH_CHECK_VALUE(false, msg);
    }
  }
}

}  // namespace fastar
