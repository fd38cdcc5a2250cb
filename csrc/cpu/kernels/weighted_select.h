// Selection of a threshold key by mass on the CPU, compiled per ISA (cpu/vec.h): the top-p cuts of sample_cfg
// and diffusion_unmask, among the few tokens that can hold them.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"

FASTAR_ISA_BEGIN

struct Candidate {
  uint32_t key;
  uint64_t w;
};

// The largest key T among the candidates whose weights over {key >= T} sum to at least target
// (1 <= target <= their total): a quickselect that partitions by key and descends by mass. Reorders them.
inline uint32_t weighted_select(Candidate* first, Candidate* last, uint64_t target) {
  auto mass = [](const Candidate* a, const Candidate* b) {
    uint64_t s = 0;
    for (; a != b; ++a) s += a->w;
    return s;
  };
  for (;;) {
    const uint32_t a = first->key, b = first[(last - first) / 2].key, c = last[-1].key;
    const uint32_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    Candidate* above = std::partition(first, last, [pivot](const Candidate& k) { return k.key > pivot; });
    Candidate* below = std::partition(above, last, [pivot](const Candidate& k) { return k.key == pivot; });
    const uint64_t hi = mass(first, above);
    if (hi >= target) {
      last = above;  // holds mass >= target >= 1, so it is not empty
      continue;
    }
    const uint64_t with_pivot = hi + mass(above, below);
    if (with_pivot >= target) return pivot;
    target -= with_pivot;
    first = below;
  }
}

FASTAR_ISA_END
