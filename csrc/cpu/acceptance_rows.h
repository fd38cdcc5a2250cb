// The per-row driver shared by the CPU acceptance kernels: rows in parallel, -1 padding, and the
// num_accepted encoding of a row status (negative = -status, see core/acceptance.h).
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "core/tree_acceptance.h"

namespace fastar {

// row_fn(b, out_row, &accepted) -> status; on success out_row[0..accepted] holds the emitted tokens.
template <typename RowFn>
void for_each_acceptance_row(int32_t* tokens, int32_t* num_accepted, int64_t B, int64_t n, RowFn row_fn) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* out = tokens + b * (n + 1);
      int64_t accepted = 0;
      const int32_t status = row_fn(b, out, &accepted);
      for (int64_t i = status ? 0 : accepted + 1; i <= n; ++i) out[i] = -1;
      num_accepted[b] = status ? -status : static_cast<int32_t>(accepted);
    }
  });
}

// Where the tree kernels' walks write a row's outputs: path and token slot i (core/tree_acceptance.h's emit).
struct TreeRowOutputs {
  const TreeSampleParams& prm;
  int32_t* path;
  int32_t* tokens;

  void emit(int64_t i, int64_t node, int64_t token) const {
    tokens[i] = static_cast<int32_t>(token);
    if (node >= 0) path[i + prm.root_in_path] = static_cast<int32_t>(node + prm.root_in_path);
  }
};

// The per-row driver of the tree kernels, rows in parallel: path and tokens [B, max_depth + 1] -1 padded, every
// node checked (tree_node_status<P>), then walk(b, outputs, &accepted) -> status; num_accepted as
// for_each_acceptance_row writes it. make_scratch() gives each thread what its walks share.
template <typename P, typename MakeScratch, typename Walk>
void for_each_tree_row(const TreeSampleParams& prm, bool probabilities, MakeScratch make_scratch, Walk walk) {
  const int64_t W = prm.max_depth + 1;
  at::parallel_for(0, prm.B, 1, [&](int64_t b0, int64_t b1) {
    auto scratch = make_scratch();
    auto load = [](const P* row, int64_t t) { return static_cast<float>(row[t]); };
    for (int64_t b = b0; b < b1; ++b) {
      TreeRowOutputs out{prm, prm.path + b * W, prm.tokens + b * W};
      for (int64_t i = 0; i < W; ++i) out.path[i] = out.tokens[i] = -1;
      int32_t status = 0;
      for (int64_t t = 0; t < prm.N; ++t) status |= tree_node_status<P>(prm, b, t, probabilities, load);
      int64_t accepted = 0;
      if (!status) {
        if (prm.root_in_path) out.path[0] = 0;
        status = walk(b, out, scratch, &accepted);
      }
      if (status) {
        for (int64_t i = 0; i < W; ++i) out.path[i] = out.tokens[i] = -1;
      }
      prm.num_accepted[b] = status ? -status : static_cast<int32_t>(accepted);
    }
  });
}

}  // namespace fastar
