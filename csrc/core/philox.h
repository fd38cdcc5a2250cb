// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator, so every (seed, offset, row, position) gets its own numbers on any device, in any order.
#pragma once
#include <cstdint>

#include "core/macros.h"

namespace fastar {

struct Philox4x32 {
  uint32_t v[4];
};

FASTAR_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FASTAR_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, ctr.v[0]), lo0 = kM0 * ctr.v[0];
    const uint32_t hi1 = mulhi32(kM1, ctr.v[2]), lo1 = kM1 * ctr.v[2];
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Seed and offset either as values or as pointers to int64 scalars in device memory (read by the kernel,
// so a CUDA graph can replay with new values without a host sync). A null pointer means "use the value".
struct PhiloxSeed {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;

  FASTAR_HD uint64_t get_seed() const { return seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed; }
  FASTAR_HD uint64_t get_offset() const { return offset_ptr ? static_cast<uint64_t>(*offset_ptr) : offset; }
};

// The numbers of one (row, position): counter = (position, row, offset), key = seed.
FASTAR_HD Philox4x32 philox_at(uint64_t seed, uint64_t offset, uint32_t row, uint32_t position) {
  return philox4x32_10(Philox4x32{{position, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace fastar
