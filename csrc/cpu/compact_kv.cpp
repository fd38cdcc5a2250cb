// fastar.compact_kv on the CPU (ops/compact_kv_args.h): every row is checked first (core/compact_kv.h), and the first
// bad one raises with its reason before anything moves; then each (row, cache) moves its kept rows in increasing
// position order.
#include <ATen/Parallel.h>

#include <cstring>

#include "ops/compact_kv_args.h"

namespace fastar {
namespace {

// Raises for row b, which compact_row_status refused, naming the first reason.
[[noreturn]] void raise_bad_row(const CompactKvParams& p, int64_t b) {
  constexpr const char* op = "fastar.compact_kv";
  const int64_t accepted = p.num_accepted[b], start = p.seqlens[b];
  const int64_t n = accepted + (p.root_in_path ? 1 : 0);
  TORCH_CHECK_VALUE(accepted >= 0, op, ": num_accepted[", b, "] = ", accepted,
                    " is negative (a row the acceptance kernel marked: ", accept::describe_status(-accepted), ")");
  TORCH_CHECK_VALUE(n <= p.W && n <= p.num_nodes, op, ": num_accepted[", b, "] = ", accepted, " keeps ", n,
                    " nodes, more than the path holds (", p.W, " columns) or the tree has (", p.num_nodes, ")");
  TORCH_CHECK_VALUE(start >= 0 && start <= p.capacity - p.num_nodes, op, ": cache_seqlens[", b, "] = ", start,
                    ": the tree's ", p.num_nodes, " nodes after it must fit the cache's capacity of ", p.capacity);
  const int32_t* path = p.path + b * p.W;
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK_INDEX(path[j] >= 0 && path[j] < p.num_nodes, op, ": path[", b, ", ", j, "] = ", path[j],
                      " is not a node of the tree [0, ", p.num_nodes, ") but lies in the accepted part (num_accepted[",
                      b, "] = ", accepted, ")");
    TORCH_CHECK_VALUE(j == 0 || path[j] > path[j - 1], op, ": path[", b,
                      "] must increase along the accepted part "
                      "(a parent comes before its child), got ",
                      path[j - 1], " then ", path[j], " at column ", j);
  }
  TORCH_CHECK_VALUE(!p.root_in_path || path[0] == 0, op,
                    ": with root_in_path the path starts at the root (node 0), "
                    "got path[",
                    b, ", 0] = ", path[0]);
  TORCH_CHECK_INDEX(false, op, ": block_table row ", b, " holds a page outside [0, ", p.num_pages,
                    ") for a position the move touches");
}

void move_rows(const CompactKvParams& p, uint8_t* base, int64_t s0, int64_t s1, int64_t b, int64_t keep) {
  const int32_t* path = p.path + b * p.W;
  const int64_t start = p.seqlens[b];
  for (int64_t j = 0; j < keep; ++j) {
    if (path[j] == j) continue;  // already in place
    std::memcpy(compact_slot(p, base, s0, s1, b, start + j), compact_slot(p, base, s0, s1, b, start + path[j]),
                p.row_bytes);
  }
}

}  // namespace

void run_compact_kv_cpu(CompactKvLaunch& l) {
  TORCH_CHECK_VALUE(l.k_cache.is_cpu(), "fastar.compact_kv: expected CPU tensors");
  const CompactKvParams& p = l.prm;
  for (int64_t b = 0; b < p.B; ++b) {  // every row before anything moves
    int64_t keep;
    if (compact_row_status(p, b, &keep) != accept::kOk) raise_bad_row(p, b);
    p.new_seqlens[b] = compact_new_length(p, b, accept::kOk, keep);
  }
  // Item i: sequence i % B of layer i / B / 2, in K or V.
  auto move = [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t b = i % p.B, l = i / p.B / 2;
      const bool is_v = i / p.B % 2;
      int64_t keep;
      compact_row_status(p, b, &keep);
      if (is_v)
        move_rows(p, p.v + l * p.v_sl, p.v_s0, p.v_s1, b, keep);
      else
        move_rows(p, p.k + l * p.k_sl, p.k_s0, p.k_s1, b, keep);
    }
  };
  // A decoding step's move (a few rows per sequence) is done before a parallel region would have started; at most
  // kSerialBytes are moved by one thread.
  constexpr int64_t kSerialBytes = int64_t{1} << 20;
  const int64_t items = 2 * p.layers * p.B, item_bytes = std::max<int64_t>(1, p.W * p.row_bytes);
  if (items * item_bytes <= kSerialBytes) {
    move(0, items);
  } else {
    at::parallel_for(0, items, std::max<int64_t>(1, kSerialBytes / 4 / item_bytes), move);
  }
}

}  // namespace fastar
