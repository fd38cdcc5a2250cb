// fastar.compact_kv on the CPU (ops/compact_kv_args.h): every row is checked first (core/compact_kv.h), and the first
// bad one raises with its reason before anything moves; then each (row, cache) moves its kept rows in increasing
// position order.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

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

// One kept row's copy.
struct RowMove {
  uint8_t* dst;
  const uint8_t* src;
};

// The moves of item i (sequence i % B of layer i / B / 2, in K or V) in increasing position order, appended to out.
void item_moves(const CompactKvParams& p, int64_t i, std::vector<RowMove>& out) {
  const int64_t b = i % p.B, l = i / p.B / 2;
  const bool is_v = i / p.B % 2;
  uint8_t* base = is_v ? p.v + l * p.v_sl : p.k + l * p.k_sl;
  const int64_t s0 = is_v ? p.v_s0 : p.k_s0, s1 = is_v ? p.v_s1 : p.k_s1;
  const int64_t start = p.seqlens[b], keep = p.new_seqlens[b] - start;  // every row was checked: its new length
  const int32_t* path = p.path + b * p.W;
  for (int64_t j = 0; j < keep; ++j)
    if (path[j] != j)  // else already in place
      out.push_back({compact_slot(p, base, s0, s1, b, start + j), compact_slot(p, base, s0, s1, b, start + path[j])});
}

// Copies the moves in order, the lines of the rows kAheadBytes ahead prefetched (sources to read, destinations to
// write): the rows are scattered positions of a cache that is cold after a forward pass, and one copy after
// another would each wait for DRAM on its own.
void copy_rows(const std::vector<RowMove>& moves, int64_t row_bytes) {
  constexpr int64_t kLine = 64, kAheadBytes = 16 << 10;
  const int64_t span = (row_bytes + kLine - 1) / kLine * kLine;  // a move's prefetched bytes
  size_t ahead = 0;                                              // the move being prefetched
  int64_t ahead_line = 0;                                        // its next line
  int64_t ahead_bytes = 0;                                       // bytes prefetched beyond the moves copied
  for (const RowMove& m : moves) {
    while (ahead < moves.size() && ahead_bytes < kAheadBytes) {
      __builtin_prefetch(moves[ahead].src + ahead_line, 0, 2);
      __builtin_prefetch(moves[ahead].dst + ahead_line, 1, 2);
      ahead_bytes += kLine;
      if ((ahead_line += kLine) == span) ahead_line = 0, ++ahead;
    }
    std::memcpy(m.dst, m.src, row_bytes);
    ahead_bytes -= span;
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
  auto move = [&](int64_t first, int64_t last) {
    std::vector<RowMove> moves;
    for (int64_t i = first; i < last; ++i) item_moves(p, i, moves);
    copy_rows(moves, p.row_bytes);
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
