// The per-row driver shared by the CPU acceptance kernels: rows in parallel, -1 padding, and the
// num_accepted encoding of a row status (negative = -status, see core/acceptance.h).
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

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

}  // namespace fastar
