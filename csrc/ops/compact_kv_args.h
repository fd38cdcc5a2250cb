// fastar.compact_kv: argument checks and the kernel parameters (core/compact_kv.h), shared by the CPU and CUDA glue.
// Value checks (the path, the lengths, the pages) are the kernels' business: the CPU raises before it moves
// anything, CUDA leaves a bad row untouched and marks its new length (docs/acceptance.md, "KV compaction").
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "core/compact_kv.h"
#include "ops/common.h"

namespace fastar {

struct CompactKvLaunch {
  at::Tensor k_cache, path, num_accepted, seqlens, block_table, new_seqlens;  // the tensors prm points into
  CompactKvParams prm;
};

// The cache's dims from `first` on are [B or pages, S_max or page_size, row...] (first = 1 for stacked layers).
inline void check_compact_cache(const char* op, const char* name, const at::Tensor& t, int64_t first) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kChar || st == at::kByte ||
                       st == at::kFloat8_e4m3fn || st == at::kFloat8_e5m2,
                   op, ": ", name,
                   " must be float32, float16, bfloat16, or the codes or scales of a quantized cache (int8, uint8, "
                   "float8_e4m3fn, float8_e5m2), got ",
                   st);
  TORCH_CHECK_VALUE(t.dim() >= 2 + first, op, ": ", name, " must be ", first ? "[layers, " : "[", "B, S_max, ...] or ",
                    first ? "[layers, " : "[", "num_pages, page_size, ...], got shape ", t.sizes());
  // One position's row is dense, and rows, sequences (pages) and layers do not overlap.
  int64_t row = 1;
  for (int64_t d = t.dim() - 1; d >= 2 + first; --d) {
    TORCH_CHECK_VALUE(t.size(d) == 1 || t.stride(d) == row, op, ": ", name,
                      " must be dense past its first two dimensions (one position's row contiguous), got strides ",
                      t.strides());
    row *= t.size(d);
  }
  // The outer dims (layers, B or pages, positions) by increasing stride: each steps past the extent of the smaller
  // ones, starting from a row (so any order works: a head-major [B, H, S, D] cache permuted to [H, B, S, D]).
  std::vector<std::pair<int64_t, int64_t>> outer;  // (stride, size) of the outer dims of size > 1
  for (int64_t d = 0; d < 2 + first; ++d)
    if (t.size(d) > 1) outer.emplace_back(t.stride(d), t.size(d));
  std::sort(outer.begin(), outer.end());
  int64_t extent = row;
  for (const auto& [stride, size] : outer) {
    TORCH_CHECK_VALUE(stride >= extent, op, ": ", name, " has overlapping positions (shape ", t.sizes(), ", strides ",
                      t.strides(), ")");
    extent = stride * size;
  }
}

inline void check_int32(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline CompactKvLaunch prepare_compact_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& path,
                                          const at::Tensor& num_accepted, const at::Tensor& cache_seqlens,
                                          const std::optional<at::Tensor>& block_table, int64_t num_nodes,
                                          bool root_in_path, bool stacked) {
  constexpr const char* op = "fastar.compact_kv";
  const int64_t first = stacked ? 1 : 0;  // the dim of B (or pages)
  check_compact_cache(op, "k_cache", k_cache, first);
  check_compact_cache(op, "v_cache", v_cache, first);
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have k_cache's dtype ",
                   k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.numel() == 0 || k_cache.data_ptr() != v_cache.data_ptr(), op,
                    ": k_cache and v_cache must be different tensors");
  check_int32(op, "path", path, 2);
  check_int32(op, "num_accepted", num_accepted, 1);
  check_int32(op, "cache_seqlens", cache_seqlens, 1);
  const int64_t B = path.size(0), W = path.size(1);
  TORCH_CHECK_VALUE(W >= 1, op, ": path must have at least one column [B, depth + 1], got shape ", path.sizes());
  TORCH_CHECK_VALUE(num_accepted.size(0) == B, op, ": num_accepted must have shape [", B, "] (path's rows), got ",
                    num_accepted.sizes());
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == B, op, ": cache_seqlens must have shape [", B, "] (path's rows), got ",
                    cache_seqlens.sizes());
  TORCH_CHECK_VALUE(num_nodes >= 1, op, ": num_nodes must be at least 1 (the tree's nodes), got ", num_nodes);
  int64_t capacity = k_cache.size(first + 1);
  if (block_table) {
    check_int32(op, "block_table", *block_table, 2);
    TORCH_CHECK_VALUE(block_table->size(0) == B, op, ": block_table must have shape [", B, ", max_pages], got ",
                      block_table->sizes());
    TORCH_CHECK_VALUE(k_cache.size(first + 1) >= 1, op, ": a paged cache needs page_size >= 1, got shape ",
                      k_cache.sizes());
    capacity = block_table->size(1) * k_cache.size(first + 1);
    check_same_device(op, "block_table", *block_table, k_cache);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(first) == B, op, ": a contiguous cache must have one sequence per row of path (", B,
                      "), got shape ", k_cache.sizes());
  }
  TORCH_CHECK_VALUE(num_nodes <= capacity, op, ": ", num_nodes, " tree nodes do not fit the cache's capacity of ",
                    capacity, " positions");
  check_same_device(op, "v_cache", v_cache, k_cache);
  check_same_device(op, "path", path, k_cache);
  check_same_device(op, "num_accepted", num_accepted, k_cache);
  check_same_device(op, "cache_seqlens", cache_seqlens, k_cache);

  CompactKvLaunch l;
  l.k_cache = k_cache;
  l.new_seqlens = at::empty({B}, cache_seqlens.options());
  CompactKvParams& p = l.prm;
  p = CompactKvParams{};
  const int64_t item = k_cache.element_size();
  p.k = static_cast<uint8_t*>(k_cache.data_ptr());
  p.v = static_cast<uint8_t*>(v_cache.data_ptr());
  p.row_bytes = item;
  for (int64_t d = first + 2; d < k_cache.dim(); ++d) p.row_bytes *= k_cache.size(d);
  p.layers = stacked ? k_cache.size(0) : 1;
  p.k_sl = stacked ? k_cache.stride(0) * item : 0;
  p.v_sl = stacked ? v_cache.stride(0) * item : 0;
  p.k_s0 = k_cache.stride(first) * item;
  p.k_s1 = k_cache.stride(first + 1) * item;
  p.v_s0 = v_cache.stride(first) * item;
  p.v_s1 = v_cache.stride(first + 1) * item;
  l.path = path.contiguous();
  l.num_accepted = num_accepted.contiguous();
  l.seqlens = cache_seqlens.contiguous();
  p.path = l.path.data_ptr<int32_t>();
  p.W = W;
  p.num_accepted = l.num_accepted.data_ptr<int32_t>();
  p.seqlens = l.seqlens.data_ptr<int32_t>();
  if (block_table) {
    l.block_table = block_table->contiguous();
    p.block_table = l.block_table.data_ptr<int32_t>();
    p.max_pages = l.block_table.size(1);
  }
  p.page_size = k_cache.size(first + 1);
  p.num_pages = k_cache.size(first);
  p.new_seqlens = l.new_seqlens.data_ptr<int32_t>();
  p.B = B;
  p.num_nodes = num_nodes;
  p.capacity = capacity;
  p.root_in_path = root_in_path;
  return l;
}

// The op as its schema declares it (csrc/schemas.h); Run is run_compact_kv_cpu (cpu/compact_kv.cpp) or
// run_compact_kv_cuda (cuda/compact_kv_glue.cpp).
void run_compact_kv_cpu(CompactKvLaunch& l);
void run_compact_kv_cuda(CompactKvLaunch& l);

template <void (*Run)(CompactKvLaunch&)>
at::Tensor compact_kv_op(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& path,
                         const at::Tensor& num_accepted, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& block_table, int64_t num_nodes, bool root_in_path,
                         bool stacked) {
  CompactKvLaunch l = prepare_compact_kv(k_cache, v_cache, path, num_accepted, cache_seqlens, block_table, num_nodes,
                                         root_in_path, stacked);
  Run(l);
  return l.new_seqlens;
}

}  // namespace fastar
