// Math of the token-acceptance kernels, shared by the CPU kernels and the CUDA kernels so that the same
// seed gives the same tokens on every backend.
//
// Exactness across backends: a sampled token depends on sums over a probability row, and a CUDA block sums
// in another order than a CPU loop. Weights are therefore turned into 40-bit fixed point (rounded to
// nearest) and summed as uint64, which is associative: every backend gets bit-identical totals, prefix
// sums and tokens. A weight below 2^-41 counts as zero (at most V * 2^-41 of probability mass moves, far
// below any test's reach).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "core/dtype.h"
#include "core/macros.h"
#include "core/philox.h"

namespace fastar::accept {

// Per-row status, OR-ed together. A row with a nonzero status has all tokens -1 and num_accepted = -status.
enum Status : int32_t {
  kOk = 0,
  kBadNumDraft = 1,  // num_draft_tokens[b] outside [0, n]
  kBadTokenId = 2,   // a draft token id outside [0, V)
  kBadValue = 4,     // a probability that is NaN, negative or > 1 (or a NaN logit)
  kZeroMass = 8,     // the row to sample from has no probability mass
  kBadTree = 16,     // a tree node's parent not before it, or a node deeper than max_depth
  kBadPath = 32,     // compact_kv: an accepted path or cache position it cannot move (core/compact_kv.h)
};

// What each status bit means, in error messages (CPU ops, fastar.check_rows via fastar._C.describe_status).
struct StatusText {
  int32_t bit;
  const char* text;
};
inline constexpr StatusText kStatusTexts[] = {
    {kBadNumDraft, "num_draft_tokens outside [0, n]"},
    {kBadTokenId, "a draft token id outside [0, V)"},
    {kBadValue, "a probability that is NaN, negative or greater than 1 (or a NaN logit)"},
    {kZeroMass, "a distribution to sample from with zero total probability"},
    {kBadTree, "a malformed tree (a parent not before its node, or a node deeper than max_depth)"},
    {kBadPath,
     "an accepted path compact_kv cannot apply (num_accepted past the path, a node outside the tree or not after "
     "the previous one, the tree past the cache's capacity, or a page outside the pool)"},
};

// The texts of a status's bits, joined by "; " (host code).
inline std::string describe_status(int32_t status) {
  std::string s;
  for (const StatusText& t : kStatusTexts)
    if (status & t.bit) s += (s.empty() ? "" : "; ") + std::string(t.text);
  return s;
}

FASTAR_HD bool prob_ok(float p) { return p >= 0.0f && p <= 1.0f; }  // false for NaN

FASTAR_HD uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// round(w * 2^40) for w in [0, 2^12) (validated values are <= 1; negatives and NaN give 0): w * 2^40 is
// exact in double, and adding 2^52 leaves the rounded integer in the low mantissa bits. Branch-free, so
// the CPU kernels vectorise the same computation.
constexpr double kFixedScale = 1099511627776.0;     // 2^40
constexpr double kRoundMagic = 4503599627370496.0;  // 2^52
constexpr uint64_t kRoundMagicBits = 0x4330000000000000ull;
FASTAR_HD uint64_t fixed_weight(float w) {
  return double_bits(static_cast<double>(w > 0.0f ? w : 0.0f) * kFixedScale + kRoundMagic) - kRoundMagicBits;
}

// Weight of token t in the residual norm(max(0, p - q)). Without draft probs q is one-hot at the draft.
FASTAR_HD uint64_t residual_weight(float p, float q) { return fixed_weight(p - q); }

// Leviathan/Chen: accept iff u <= p/q, with u uniform in [0, 1) drawn at 53 bits; written without the
// division so q = 0 accepts and p = 0 rejects. Computed in double: identical on every backend.
FASTAR_HD bool accept_draft(double u, float p, float q) { return u * static_cast<double>(q) < static_cast<double>(p); }

struct Draw {
  double accept_u;       // uniform in [0, 1), 53 bits
  uint64_t sample_bits;  // 64 random bits that pick a token by fixed-point inverse CDF
};

FASTAR_HD Draw draw(const PhiloxSeed& s, uint32_t row, uint32_t position) {
  const Philox4x32 r = philox_at(s.get_seed(), s.get_offset(), row, position);
  const uint64_t a = ((static_cast<uint64_t>(r.v[0]) << 32) | r.v[1]) >> 11;
  return Draw{static_cast<double>(a) * (1.0 / 9007199254740992.0), (static_cast<uint64_t>(r.v[2]) << 32) | r.v[3]};
}

FASTAR_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// The token is the first index whose inclusive fixed-point prefix sum exceeds this target in [0, total).
FASTAR_HD uint64_t sample_target(uint64_t bits, uint64_t total) { return mulhi64(bits, total); }

}  // namespace fastar::accept

namespace fastar {

// Draft ids and ragged lengths may be int32 or int64 tensors; one runtime branch instead of more kernels.
FASTAR_HD int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// Arguments of one launch, filled by the glue from tensors; strides in elements, V-stride is 1.
// Probability pointers are typed by the kernel (float, half or bfloat16).
struct SpeculativeSampleParams {
  const void* draft_ids;  // [B, n]
  bool ids64;
  int64_t ids_sb;
  const void* num_draft;  // [B] or null (every row uses n drafts)
  bool nd64;
  const void* draft_probs;  // [B, n, V] or null (q one-hot at the draft)
  int64_t dp_sb, dp_sn;
  const void* target_probs;  // [B, n+1, V]
  int64_t tp_sb, tp_sn;
  int32_t* tokens;        // [B, n+1]
  int32_t* num_accepted;  // [B]
  int64_t B, n, V;
  PhiloxSeed seed;
};

struct GreedyVerifyParams {
  const void* draft_ids;  // [B, n]
  bool ids64;
  int64_t ids_sb;
  const void* num_draft;  // [B] or null
  bool nd64;
  const void* target_logits;  // [B, n+1, V]
  int64_t tl_sb, tl_sn;
  int32_t* tokens;        // [B, n+1]
  int32_t* num_accepted;  // [B]
  int64_t B, n, V;
};

// Number of drafts of row b, or -1 when it is outside [0, n].
FASTAR_HD int64_t row_num_draft(const void* num_draft, bool nd64, int64_t b, int64_t n) {
  if (!num_draft) return n;
  const int64_t k = load_index(num_draft, nd64, b);
  return (k < 0 || k > n) ? -1 : k;
}

}  // namespace fastar
