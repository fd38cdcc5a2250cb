// The argmax of one row on the CPU (torch.argmax's rule), compiled per ISA (cpu/vec.h): the greedy acceptance
// kernels' inner loop.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vec.h"

FASTAR_ISA_BEGIN

// First index of the maximum (torch.argmax's tie rule); -1 when the row holds a NaN. Two passes over the
// row (max, then the first index holding it): vectorised, and the second pass reads from cache.
template <typename P>
inline int64_t argmax_row(const P* row, int64_t V) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t t = 0;
  Vec mv = Vec::broadcast(best);
  for (; t + kW <= V; t += kW) {
    const Vec x = Vec::load(row + t);
    mv = max(mv, x);
    nan |= any_nan(x);
  }
  best = hmax(mv);
  for (; t < V; ++t) {
    const float v = static_cast<float>(row[t]);
    nan |= std::isnan(v);
    best = v > best ? v : best;
  }
  if (nan) return -1;
  t = 0;
  for (; t + kW <= V; t += kW) {
    const int hit = first_equal(Vec::load(row + t), best);
    if (hit >= 0) return t + hit;
  }
  for (; t < V; ++t) {
    if (static_cast<float>(row[t]) == best) return t;
  }
  return 0;  // every value is -inf: index 0, as torch.argmax
}

FASTAR_ISA_END
