#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/attention.cuh"
#include "cuda/launchers.h"

namespace fastar {
namespace {

// Items whose rows (GQA group x query positions) fit kDecodeRows take the decode shape (warps split the keys).
constexpr int64_t kDecodeRows = 8;
// Every kv split gets at least this many keys, so that its partial result is cheap next to its reads.
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kMaxSplits = 64;

template <int kDC_, bool kDecode_>
struct Config {
  static constexpr int kDC = kDC_;  // ceil(D / 32) registers per row and lane for the output
  static constexpr bool kDecode = kDecode_;
  static constexpr int kKeySlices = kDecode ? (kDC <= 4 ? 4 : 2) : 1;
  static constexpr int kRowsPerWarp = kDC <= 4 ? 8 : 4;  // accumulators per lane: kRowsPerWarp * kDC <= 32
  static constexpr int kRows = cuda::kAttnWarps / kKeySlices * kRowsPerWarp;
  static constexpr int kBk = 32 * kKeySlices;
  static_assert(!kDecode || kRows == kDecodeRows, "the decode shape holds kDecodeRows rows");
};

template <bool kDecode, typename F>
void with_config(int64_t D, F&& f) {
  if (D <= 64) return f(Config<2, kDecode>{});
  if (D <= 96) return f(Config<3, kDecode>{});  // 80, 96: 3 lanes' worth, not 4
  if (D <= 128) return f(Config<4, kDecode>{});
  return f(Config<8, kDecode>{});
}

template <typename F>
void with_config(int64_t D, bool decode, F&& f) {
  if (decode) return with_config<true>(D, f);
  with_config<false>(D, f);
}

int multiprocessors() {
#if defined(__CUDACC__)
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && n > 0)
    return n;
  return 108;
#else
  return 4;  // the emulator: few blocks make small test shapes take the split path
#endif
}

struct Shape {
  bool decode;
  int64_t rows, bk;  // rows per item, keys per tile
  cuda::AttentionWork work;
  int64_t items;
};

Shape shape_of(const AttentionParams& p) {
  Shape s{};
  const int64_t G = p.Hq / p.Hkv;
  s.decode = G * p.Lq <= kDecodeRows;
  with_config(p.D, s.decode, [&](auto cfg) {
    s.rows = decltype(cfg)::kRows;
    s.bk = decltype(cfg)::kBk;
  });
  cuda::AttentionWork& w = s.work;
  w.G = G;
  // The whole group with as many positions as fit, or (a group larger than the block) a chunk of heads.
  w.ng = G < s.rows ? G : s.rows;
  w.nq = G < s.rows ? std::min<int64_t>(p.Lq, s.rows / G) : 1;
  w.n_head_chunks = (G + w.ng - 1) / w.ng;
  w.n_q_tiles = (p.Lq + w.nq - 1) / w.nq;
  s.items = p.B * p.Hkv * w.n_head_chunks * w.n_q_tiles;
  // Flash-decoding: too few items to fill the GPU, so the keys are split too (kv_lens are on the device,
  // so the split count follows the capacity Lk; a split past a sequence's end writes an empty state).
  const int64_t target = 2 * static_cast<int64_t>(multiprocessors());
  w.splits = 1;
  if (s.items > 0 && s.items < target) {
    const int64_t by_keys = std::max<int64_t>(1, p.Lk / kMinKeysPerSplit);
    w.splits = std::min({(target + s.items - 1) / s.items, by_keys, kMaxSplits});
  }
  return s;
}

template <typename K>
void allow_dynamic_smem(K* kernel, int64_t bytes) {
#if defined(__CUDACC__)
  // Above 48 KiB a kernel must opt in (D = 128 and 256 need up to ~85 KiB).
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("fastar: attention needs ") + std::to_string(bytes) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
  }
#else
  (void)kernel;
  (void)bytes;
#endif
}

}  // namespace

AttentionPlan plan_attention(const AttentionParams& prm) {
  const Shape s = shape_of(prm);
  const int64_t splits = s.work.splits;
  return AttentionPlan{splits, splits > 1 ? splits * prm.B * prm.Hq * prm.Lq * (prm.D + 2) : 0};
}

void launch_attention(const AttentionParams& prm, FloatKind kind, const AttentionPlan& plan, float* workspace,
                      void* stream) {
  if (prm.D > kAttentionMaxHeadDim) throw std::invalid_argument("fastar.attention: head dim above 256");
  Shape s = shape_of(prm);
  cuda::AttentionWork& w = s.work;
  if (plan.splits != w.splits) throw std::logic_error("fastar.attention: launch_attention got another plan");
  const int64_t rows = prm.B * prm.Hq * prm.Lq;
  if (w.splits > 1) {
    w.part_o = workspace;
    w.part_ml = workspace + w.splits * rows * prm.D;
  }
  const int64_t merge_blocks = (rows + cuda::kAttnWarps - 1) / cuda::kAttnWarps;
  if (s.items > 0x7fffffff || merge_blocks > 0x7fffffff)
    throw std::invalid_argument("fastar.attention: too many (batch, head, query) rows for one launch");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    with_config(prm.D, s.decode, [&](auto cfg) {
      using C = decltype(cfg);
      auto* kernel = &cuda::attention_kernel<T, C::kDC, C::kRowsPerWarp, C::kKeySlices>;
      const int64_t smem = cuda::attn_smem_layout<C::kKeySlices, C::kRowsPerWarp>(static_cast<int>(prm.D)).bytes;
      allow_dynamic_smem(kernel, smem);
      launch_kernel(C::kDecode ? "attention_decode" : "attention_tiled", kernel,
                    dim3(static_cast<unsigned>(s.items), static_cast<unsigned>(w.splits)), dim3(cuda::kAttnThreads),
                    static_cast<size_t>(smem), st, prm, w);
    });
    if (w.splits > 1) {
      launch_kernel("attention_merge", &cuda::attention_merge_kernel<T>, dim3(static_cast<unsigned>(merge_blocks)),
                    dim3(cuda::kAttnThreads), 0, st, prm, w);
    }
  });
}

}  // namespace fastar
