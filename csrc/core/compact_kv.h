// fastar.compact_kv: after a tree's verification appended its nodes at positions cache_seqlens[b] + i (node i), keep
// the accepted nodes path[b, 0..keep) at the consecutive positions cache_seqlens[b] + j. Shared by the CPU and CUDA
// kernels: the row's checks and the address of a position. The caches are moved as bytes (any element type).
#pragma once
#include <cstdint>

#include "core/acceptance.h"
#include "core/macros.h"

namespace fastar {

struct CompactKvParams {
  uint8_t* k;  // the caches: [B, S_max, row] contiguous, or [num_pages, page_size, row] with block_table; stacked:
  uint8_t* v;  // [layers, ...] of those (every layer moves the same rows)
  int64_t layers, k_sl, v_sl;      // layers (1 unless stacked) and their byte strides
  int64_t row_bytes;               // bytes of one position's row (unit stride)
  int64_t k_s0, k_s1, v_s0, v_s1;  // byte strides of dims 0 (sequence or page) and 1 (position or slot)
  const int32_t* path;             // [B, W]: the accepted nodes, root-side first, -1 padded
  int64_t W;                       // path's width (the tree's depth + 1)
  const int32_t* num_accepted;     // [B]: the accepted drafts (negative: a row an acceptance kernel marked)
  const int32_t* seqlens;          // [B]: the tokens before the tree
  const int32_t* block_table;      // [B, max_pages] or nullptr (contiguous caches)
  int64_t max_pages, page_size, num_pages;
  int32_t* new_seqlens;            // [B]: seqlens[b] + keep, or a marked row's -status
  int64_t B, num_nodes, capacity;  // tree nodes appended; positions a sequence can hold
  bool root_in_path;               // path[0] is the root (node 0, itself one of the nodes): keep = accepted + 1
};

// Row b's status (accept::kOk, or the negative status of a marked num_accepted as a positive one) and the rows to
// keep. The path's kept entries must be tree nodes in increasing order (so path[j] >= j: an ascending in-place move
// never reads a position it has overwritten), the tree must fit the capacity and every page touched must exist.
FASTAR_HD int32_t compact_row_status(const CompactKvParams& p, int64_t b, int64_t* keep) {
  *keep = 0;
  const int64_t accepted = p.num_accepted[b];
  if (accepted < 0) return static_cast<int32_t>(-accepted);
  const int64_t start = p.seqlens[b], n = accepted + (p.root_in_path ? 1 : 0);
  if (n > p.W || n > p.num_nodes || start < 0 || start > p.capacity - p.num_nodes) return accept::kBadPath;
  const int32_t* path = p.path + b * p.W;
  int64_t previous = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (path[j] <= previous || path[j] >= p.num_nodes) return accept::kBadPath;
    previous = path[j];
  }
  if (p.root_in_path && path[0] != 0) return accept::kBadPath;
  if (p.block_table != nullptr && n > 0) {  // pages of positions start .. start + path[n - 1]
    for (int64_t page = start / p.page_size; page <= (start + previous) / p.page_size; ++page) {
      const int32_t id = p.block_table[b * p.max_pages + page];
      if (id < 0 || id >= p.num_pages) return accept::kBadPath;
    }
  }
  *keep = n;
  return accept::kOk;
}

// The byte address of sequence b's position pos in a cache with strides s0, s1.
FASTAR_HD uint8_t* compact_slot(const CompactKvParams& p, uint8_t* base, int64_t s0, int64_t s1, int64_t b,
                                int64_t pos) {
  if (p.block_table == nullptr) return base + b * s0 + pos * s1;
  const int64_t page = p.block_table[b * p.max_pages + pos / p.page_size];
  return base + page * s0 + (pos % p.page_size) * s1;
}

// The new length of row b: the kept tokens after the prefix, or -status for a row left untouched.
FASTAR_HD int32_t compact_new_length(const CompactKvParams& p, int64_t b, int32_t status, int64_t keep) {
  return status == accept::kOk ? static_cast<int32_t>(p.seqlens[b] + keep) : -status;
}

}  // namespace fastar
