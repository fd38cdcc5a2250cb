// The schema of every fastar op and the tables of its kernels, in one place. Included by the two
// registration files: registration.cpp (torch.ops.fastar) and simt/registration_simt.cpp
// (torch.ops.fastar_simt, the test-only SIMT build). Each op's function (`<op>_op<Run>`, in ops/<op>_args.h) takes
// the schema's arguments, checks them and calls a backend's run_<op>_cpu or run_<op>_cuda. Only these two files
// include torch/library.h (~10 s of compile time per file); the rest include ATen's Tensor headers alone.
#pragma once
#include <torch/library.h>

#include "ops/acceptance_args.h"
#include "ops/attention_args.h"
#include "ops/compact_kv_args.h"
#include "ops/diffusion_unmask_args.h"
#include "ops/quantize_kivi_append_args.h"
#include "ops/quantize_kv_append_args.h"
#include "ops/sample_cfg_args.h"
#include "ops/scale_attention_args.h"
#include "ops/spectr_args.h"

namespace fastar {

inline void define_schemas(torch::Library& m) {
  m.def(
      "speculative_sample(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, "
      "Tensor? num_draft_tokens, Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted)");
  // LANTERN's relaxed acceptance on the same chain (docs/acceptance.md): neighbors [V, k], each token's nearest
  // codebook tokens, nearest first; delta in [0, 1] the total-variation budget of each draft's proximity set.
  m.def(
      "lantern_accept(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, Tensor neighbors, "
      "float delta, Tensor? num_draft_tokens, Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted)");
  // GSD's grouped acceptance on the same chain (docs/acceptance.md): embeddings float32 [V, d]; a draft's group is
  // itself plus its group_above / group_below ranking neighbours in p within prob_threshold of p(x) and
  // dist_threshold of its embedding (squared distance).
  m.def(
      "gsd_accept(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, Tensor embeddings, "
      "int group_above, int group_below, float prob_threshold, float dist_threshold, Tensor? num_draft_tokens, "
      "Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted)");
  // Speculative Jacobi decoding (docs/acceptance.md): the chain's exact test, then the positions after a rejection
  // get fresh drafts from their target rows: next_drafts int32 [B, n] and their probabilities float32 [B, n].
  m.def(
      "sjd_accept(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, Tensor? num_draft_tokens, "
      "Tensor seed, Tensor offset) -> (Tensor tokens, Tensor num_accepted, Tensor next_drafts, Tensor next_probs)");
  // SpecTr's K-SEQ over k i.i.d. drafts (docs/acceptance.md): drafts [B, k, n], q rows [B, k, n, V] and p rows
  // [B, k, n+1, V] at each draft's nodes; the index of the draft whose prefix was accepted, tokens [B, n+1] (-1
  // padded) and num_accepted [B].
  m.def(
      "spectr_accept(Tensor draft_token_ids, Tensor draft_probs, Tensor target_probs, Tensor seed, Tensor offset) "
      "-> (Tensor draft_index, Tensor tokens, Tensor num_accepted)");
  m.def(
      "greedy_verify(Tensor draft_token_ids, Tensor target_logits, Tensor? num_draft_tokens=None) "
      "-> (Tensor tokens, Tensor num_accepted)");
  // Drafts [B, N] on a tree (parents [B or 1, N], -1: a child of the root), target rows [B, N+1, V]; path and
  // tokens [B, max_depth + 1] (-1 padded); root_in_path numbers path as the tree with the root as node 0.
  m.def(
      "tree_speculative_sample(Tensor draft_token_ids, Tensor parents, Tensor? draft_probs, Tensor target_probs, "
      "int max_depth, bool root_in_path, Tensor seed, Tensor offset) -> (Tensor path, Tensor tokens, "
      "Tensor num_accepted)");
  // The same tree, logits [B, N+1, V]: the longest path of drafts equal to the argmax, then the argmax after it.
  m.def(
      "tree_greedy_verify(Tensor draft_token_ids, Tensor parents, Tensor target_logits, int max_depth, "
      "bool root_in_path) -> (Tensor path, Tensor tokens, Tensor num_accepted)");
  // Medusa's typical acceptance over the same tree and logits: p(x) > min(posterior_threshold, posterior_alpha *
  // exp(-H(p))), p = softmax(logits / temperature) (temperature 0: the argmax); the longest passing path.
  m.def(
      "typical_accept(Tensor draft_token_ids, Tensor parents, Tensor target_logits, int max_depth, bool root_in_path, "
      "float posterior_threshold, float posterior_alpha, float temperature) -> (Tensor path, Tensor tokens, "
      "Tensor num_accepted)");
  // Masked attention, written into `out`; returns the natural-log LSE [B, Hq, Lq] in float32 (-inf for a row
  // that sees no key). The mask is the AND of the terms given (csrc/core/attention.h); i + diag is query i's
  // own key position.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, float scale, *, "
      // q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D]; out [B, Hq, Lq, D] of q's dtype, unit stride along D,
      // sharing no memory with an input; scale multiplies the logits.
      "Tensor? kv_lens=None, "      // int32 [B]: keys of each sequence (default Lk)
      "Tensor? block_table=None, "  // int32 [B, max_pages]: paged k and v [num_pages, Hkv, page_size, D]
      "bool causal=False, "         // key j visible iff j <= i + diag
      "bool bottom_right=True, "    // diag = Lk_b - Lq (the queries are the last keys), else 0 (SDPA's is_causal)
      "int window_left=-1, "  // >= 0: key j visible iff i + diag - window_left <= j <= i + diag or j < window_sinks
      "int window_sinks=0, "  // the first keys, visible to every query of the window
      "str block_relation=\"none\", "  // causal kb <= qb, same kb == qb, prev qb - 1 <= kb <= qb, or none
      "Tensor? q_block_ids=None, "     // int32 [B or 1, Lq]: qb of each query, for block_relation
      "Tensor? k_block_ids=None, "     // int32 [B or 1, Lk]: kb of each key, for block_relation
      "Tensor? mask_bits=None, "       // uint8 [B or 1, Lq, ceil(mask_bits_cols / 8)]: little-endian bit-packed rows
      "int mask_bits_cols=0, "         // mask_bits covers the last mask_bits_cols keys of each sequence
      "Tensor? bias=None, "            // q's dtype [B or 1, Hq or 1, Lq, Lk]: added to the logits
      // Quantized k and v (int8 / float8 codes, docs/quantized_kvcache.md; CPU only so far): float32 scales that
      // broadcast to k's rows [B or pages, Hkv, Lk or page_size]; key row = codes * its scale.
      "Tensor? k_scale=None, Tensor? v_scale=None, "
      // KIVI int4 / int2 (kivi_group = G > 0; CPU only so far): k and v uint8 packed codes, [B or pages, Hkv, Lk or
      // page_size, D * bits / 8] views of [.., Hkv, bytes]-contiguous storage; k_scale / v_scale and k_zero /
      // v_zero float16 as quantize_kivi_append writes them; sequence b's first kivi_split[b] = (keys, values)
      // are quantized, later rows are read from k_window / v_window [B, W, Hkv, D] (q's dtype) at position % W.
      "Tensor? k_zero=None, Tensor? v_zero=None, Tensor? k_window=None, Tensor? v_window=None, "
      "Tensor? kivi_split=None, int kivi_group=0"
      ") -> Tensor lse");
  // Next-scale (VAR) attention: the attention kernels with scale ids, a local window, a tile map and qk_norm,
  // written into `out` as fastar.attention. Query i is token Lk - Lq + i.
  m.def(
      "scale_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, float scale, *, "
      "Tensor? token_info=None, "  // int32 [3, Lk]: (scale id, y, x) of each token
      "Tensor? scale_hw=None, "    // int32 [num_scales, 2]: (h, w) of each scale, for local_window
      "Tensor? tile_map=None, "    // uint8 [ceil(Lq / tile_q), ceil(Lk / tile_k)]: TileClass of each tile
      "str relation=\"none\", "    // scale ids as block ids: causal, same, prev, or none (every key visible)
      "int local_window=-1, "      // >= 0: a key of an earlier scale is visible iff within this many cells
      "int full_scales=0, "        // the first scales, exempt from local_window
      "bool qk_norm=False, "       // L2-normalise q and k in the kernel, then multiply q by q_scale
      "Tensor? q_scale=None, "     // float32 [Hq] (default 1), only with qk_norm
      "int tile_q=64, "            // the query tile of tile_map
      "int tile_k=64"              // the key tile of tile_map
      ") -> Tensor lse");
  // Classifier-free guidance of a doubled batch ([2B, V] or [2B, L, V], conditional rows first), top-k/top-p
  // filtering and sampling: int64 tokens [B] or [B, L] (csrc/ops/sample_cfg_args.h, csrc/core/sampling.h).
  m.def(
      "sample_cfg(Tensor logits, float cfg, str schedule, int? scale_index, int? num_scales, int top_k, float top_p, "
      "float temperature, Tensor seed, Tensor offset) -> Tensor tokens");
  // One parallel-unmasking step of a masked-diffusion LM (csrc/ops/diffusion_unmask_args.h, core/diffusion.h):
  // for every position of x's block [block_start, block_end) holding mask_id, a candidate token (the argmax of its
  // logits [B, L, V], or a draw from softmax(logits / temperature), after Dream's top-p / top-k filters) and its
  // confidence (under softmax(logits), or with confidence_source='sampling' under the candidate's own
  // distribution); then per row the rule's positions are committed into x. Returns candidates int64 [B, Lb] (-1:
  // not masked), their float32 confidences [B, Lb] (-inf: not masked) and the positions of each row's block holding
  // mask_id afterwards, int64 [B] (CUDA: -1 for a row with invalid logits or count, which commits nothing).
  m.def(
      "diffusion_unmask(Tensor logits, Tensor(a!) x, Tensor? num_transfer, int mask_id, int block_start, "
      "int block_end, str confidence, str rule, float threshold, float factor, float temperature, "
      "float confidence_noise, float top_p, int top_k, str confidence_source, Tensor seed, Tensor offset) -> "
      "(Tensor candidates, Tensor confidence, Tensor remaining)");
  // Quantize-on-append into an int8 / fp8 KV cache (docs/quantized_kvcache.md): token n's K and V rows
  // [N, Hkv, D] go to slot slot_mapping[n] of the caches [num_slots or (num_pages, page_size), Hkv, D]
  // (-1: skipped). int8 writes a scale per slot and head; fp8 does too when the scales are [num_slots, Hkv],
  // and reads them when they hold one value or one per kv head.
  m.def(
      "quantize_kv_append(Tensor key, Tensor value, Tensor slot_mapping, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor(c!) k_scale, Tensor(d!) v_scale) -> ()");
  // Quantize-on-append into a KIVI int4 / int2 cache (docs/quantized_kvcache.md): each group of group_size key
  // rows (key [Nk, Hkv, D]) per channel into cache group key_groups[g], each value row per token over groups of
  // group_size channels into slot value_slots[n] (-1: skipped). Codes uint8 [num_slots, Hkv, D * bits / 8] (the
  // bits from that shape), float16 scales and zeros [num_slots / group_size, Hkv, D] (keys) and [num_slots, Hkv,
  // D / group_size] (values).
  m.def(
      "quantize_kivi_append(Tensor key, Tensor value, Tensor key_groups, Tensor value_slots, Tensor(a!) k_codes, "
      "Tensor(b!) v_codes, Tensor(c!) k_scale, Tensor(d!) k_zero, Tensor(e!) v_scale, Tensor(f!) v_zero, "
      "int group_size) -> ()");
  // KV compaction after a tree's acceptance (docs/acceptance.md): the tree's num_nodes nodes sit at positions
  // cache_seqlens[b] + i of the caches ([B, S_max, ...], or [num_pages, page_size, ...] with block_table int32
  // [B, max_pages]); node path[b, j] (int32 [B, W]) moves to position cache_seqlens[b] + j for j < num_accepted[b]
  // (+ 1 with root_in_path), in place; stacked: the caches hold every layer, [layers, ...] of those. Returns the new
  // lengths int32 [B] (CUDA: -status for a row it left alone).
  m.def(
      "compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor path, Tensor num_accepted, Tensor cache_seqlens, "
      "Tensor? block_table, int num_nodes, bool root_in_path, bool stacked=False) -> Tensor new_seqlens");
}

// Test-only ops of the CPU kernels, in torch.ops.fastar alone (a leading underscore: no CUDA kernel, fake or
// public API; tests/test_build.py's opcheck leaves them out).
inline void define_cpu_test_schemas(torch::Library& m) {
  // The CPU attention kernel's plan (csrc/cpu/attention_plan.h) for q [B, Hq, Lq, D] and k [B or pages, Hkv,
  // Lk or page_size, D] (only their shapes are read) under the mask arguments of attention, or of
  // scale_attention (token_info, ...; then the attention ones keep their defaults), at the current number of
  // threads. Returns positions int64 [Lq] (the query positions in tile order), tile_starts int64 [T + 1]
  // (tile t holds positions[tile_starts[t]:tile_starts[t + 1]]), and for every step of every work item and kv
  // split, in order: steps int64 [S, 7] (b, kv head, tile, split, p0, np, n: the step computes n keys for the
  // tile's query positions [p0, p0 + np)), keys int64 [sum n] (the steps' keys, concatenated) and visible
  // uint8 [sum n * np] (per step, [n, np]: whether the key is marked visible to the position; all 1 for a
  // tile computed without a mask).
  m.def(
      "_attention_plan(Tensor q, Tensor k, *, Tensor? kv_lens=None, Tensor? block_table=None, bool causal=False, "
      "bool bottom_right=True, int window_left=-1, int window_sinks=0, str block_relation=\"none\", "
      "Tensor? q_block_ids=None, Tensor? k_block_ids=None, Tensor? mask_bits=None, int mask_bits_cols=0, "
      "Tensor? bias=None, Tensor? token_info=None, Tensor? scale_hw=None, Tensor? tile_map=None, "
      "str relation=\"none\", int local_window=-1, int full_scales=0, int tile_q=64, int tile_k=64) "
      "-> (Tensor positions, Tensor tile_starts, Tensor steps, Tensor keys, Tensor visible)");
}

inline void register_cpu_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_op<run_speculative_sample_cpu>);
  m.impl("lantern_accept", &lantern_accept_op<run_speculative_sample_cpu>);
  m.impl("gsd_accept", &gsd_accept_op<run_speculative_sample_cpu>);
  m.impl("sjd_accept", &sjd_accept_op<run_speculative_sample_cpu>);
  m.impl("spectr_accept", &spectr_accept_op<run_spectr_accept_cpu>);
  m.impl("greedy_verify", &greedy_verify_op<run_greedy_verify_cpu>);
  m.impl("tree_speculative_sample", &tree_speculative_sample_op<run_tree_speculative_sample_cpu>);
  m.impl("tree_greedy_verify", &tree_greedy_verify_op<run_tree_greedy_verify_cpu>);
  m.impl("typical_accept", &typical_accept_op<run_typical_accept_cpu>);
  m.impl("attention", &attention_op<run_attention_cpu>);
  m.impl("scale_attention", &scale_attention_op<run_attention_cpu>);
  m.impl("sample_cfg", &sample_cfg_op<run_sample_cfg_cpu>);
  m.impl("diffusion_unmask", &diffusion_unmask_op<run_diffusion_unmask_cpu>);
  m.impl("quantize_kv_append", &quantize_kv_append_op<run_quantize_kv_append_cpu>);
  m.impl("quantize_kivi_append", &quantize_kivi_append_op<run_quantize_kivi_append_cpu>);
  m.impl("compact_kv", &compact_kv_op<run_compact_kv_cpu>);
  m.impl("_attention_plan", &attention_plan_cpu);
}

// The CUDA kernels' glue; registered for CUDA in fastar._C and for CPU tensors in the SIMT build.
inline void register_cuda_kernels(torch::Library& m) {
  m.impl("speculative_sample", &speculative_sample_op<run_speculative_sample_cuda>);
  m.impl("lantern_accept", &lantern_accept_op<run_speculative_sample_cuda>);
  m.impl("gsd_accept", &gsd_accept_op<run_speculative_sample_cuda>);
  m.impl("sjd_accept", &sjd_accept_op<run_speculative_sample_cuda>);
  m.impl("spectr_accept", &spectr_accept_op<run_spectr_accept_cuda>);
  m.impl("tree_speculative_sample", &tree_speculative_sample_op<run_tree_speculative_sample_cuda>);
  m.impl("tree_greedy_verify", &tree_greedy_verify_op<run_tree_greedy_verify_cuda>);
  m.impl("typical_accept", &typical_accept_op<run_typical_accept_cuda>);
  m.impl("greedy_verify", &greedy_verify_op<run_greedy_verify_cuda>);
  m.impl("attention", &attention_op<run_attention_cuda>);
  m.impl("scale_attention", &scale_attention_op<run_attention_cuda>);
  m.impl("sample_cfg", &sample_cfg_op<run_sample_cfg_cuda>);
  m.impl("diffusion_unmask", &diffusion_unmask_op<run_diffusion_unmask_cuda>);
  m.impl("quantize_kv_append", &quantize_kv_append_op<run_quantize_kv_append_cuda>);
  m.impl("quantize_kivi_append", &quantize_kivi_append_op<run_quantize_kivi_append_cuda>);
  m.impl("compact_kv", &compact_kv_op<run_compact_kv_cuda>);
}

}  // namespace fastar
