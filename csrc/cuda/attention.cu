#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/attention_decode.cuh"
#include "cuda/attention_tc.cuh"
#include "cuda/launchers.h"

namespace fastar {

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

namespace {

// Items whose rows (GQA group x query positions) fit kDecodeRows take the decode shape (warps split the keys).
constexpr int64_t kDecodeRows = 8;
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
  static_assert(kDecodeRows == cuda::kDecodeRowsMax, "both decode kernels take the same items");
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

// Items of at least this many rows take the tensor-core kernel (bf16 / fp16, a tc_head_dim).
constexpr int64_t kTensorCoreRows = 16;

// Whether the tensor-core kernel takes these arguments: its cp.async copies 16-byte chunks, so every q, k
// and v row must start 16-byte aligned (fp32 stays on the CUDA-core kernel, exact to fp32 rounding). Codes
// are one byte, so their strides must be multiples of 16 elements. KIVI: packed rows of whole 16-byte chunks,
// and 16-byte loads of the windows' rows and the keys' scales and zeros.
bool use_tensor_cores(const AttentionParams& p, FloatKind kind) {
  if (kind == FloatKind::kFloat32 || !cuda::tc_head_dim(p.D) || p.Hq / p.Hkv * p.Lq < kTensorCoreRows) return false;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.kivi_bits && (p.D * p.kivi_bits % 128 != 0 || !aligned(p.kivi_k_window) || !aligned(p.kivi_v_window) ||
                      !aligned(p.kivi_k_scale) || !aligned(p.kivi_k_zero)))
    return false;
  const int64_t kv_strides = p.k_sb | p.k_sh | p.k_sl | p.v_sb | p.v_sh | p.v_sl;
  return aligned(p.q) && aligned(p.k) && aligned(p.v) && (p.q_sb | p.q_sh | p.q_sl) % 8 == 0 &&
         kv_strides % (p.kv_quantized ? 16 : 8) == 0;
}

// Whether the KIVI decode kernel (attention_decode_kivi.cuh) takes a decode-shaped call over a KIVI cache: 16-byte
// loads of codes and window rows, head dims 64 / 128 / 256, and key groups of whole 32-key chunks that never
// straddle a page (or, contiguous, a sequence's slots). qk_norm takes the tiled kernel.
bool kivi_decode_supported(const AttentionParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t G = p.kivi_group;
  return !p.qk_norm && (p.D == 64 || p.D == 128 || p.D == 256) && G % 32 == 0 &&
         (p.block_table ? p.page_size : p.Lk) % G == 0 && aligned(p.k) && aligned(p.v) && aligned(p.kivi_k_window) &&
         aligned(p.kivi_v_window);
}

// Whether the 16-byte-load decode kernel takes a decode-shaped call (attention_decode.cuh).
bool use_decode_kernel(const AttentionParams& p, FloatKind kind) {
  if (p.kivi_bits) return kivi_decode_supported(p);
  if (!cuda::tc_head_dim(p.D)) return false;
  if (p.kv_quantized) return cuda::decode_rows_aligned<uint8_t>(p);  // q in shared memory: any dtype, any D
  switch (kind) {
    case FloatKind::kFloat32:  // fp32 at D = 256: 128 accumulators per thread would spill
      return p.D <= 128 && cuda::decode_rows_aligned<float>(p);
    case FloatKind::kFloat16:
      return cuda::decode_rows_aligned<__half>(p);
    default:
      return cuda::decode_rows_aligned<__nv_bfloat16>(p);
  }
}

struct Shape {
  bool decode, tc, vec_decode;
  int64_t rows;  // rows per item
  cuda::AttentionWork work;
  int64_t items;
};

Shape shape_of(const AttentionParams& p, FloatKind kind) {
  Shape s{};
  const int64_t G = p.Hq / p.Hkv;
  s.tc = use_tensor_cores(p, kind);
  s.decode = !s.tc && G * p.Lq <= kDecodeRows;
  s.vec_decode = s.decode && use_decode_kernel(p, kind);
  // Quantized K/V that the decode kernel cannot take: the CUDA-core decode shape reads V as T, the tiled one stages it.
  if (p.kv_quantized && !s.vec_decode) s.decode = false;
  if (s.vec_decode) {
    s.rows = cuda::kDecodeRowsMax;
  } else if (s.tc) {
    s.rows = cuda::kTcRows;
  } else {
    with_config(p.D, s.decode, [&](auto cfg) { s.rows = decltype(cfg)::kRows; });
  }
  cuda::AttentionWork& w = s.work;
  w.G = G;
  // The whole group with as many positions as fit, or (a group larger than the block) a chunk of heads.
  w.ng = G < s.rows ? G : s.rows;
  w.nq = G < s.rows ? std::min<int64_t>(p.Lq, s.rows / G) : 1;
  w.n_head_chunks = (G + w.ng - 1) / w.ng;
  w.n_q_tiles = (p.Lq + w.nq - 1) / w.nq;
  s.items = p.B * p.Hkv * w.n_head_chunks * w.n_q_tiles;
  // Flash-decoding: too few items to fill the GPU, so the keys are split too. kv_lens are on the device, so the
  // launch's split count follows the capacity Lk, and each block uses as many as its sequence's real length
  // fills (cuda::block_item); the others write empty states.
  const int64_t target = 2 * static_cast<int64_t>(multiprocessors());
  w.splits = 1;
  if (s.items > 0 && s.items < target) {
    const int64_t by_keys = std::max<int64_t>(1, p.Lk / cuda::kMinKeysPerSplit);
    w.splits = std::min({(target + s.items - 1) / s.items, by_keys, kMaxSplits});
  }
  return s;
}

}  // namespace

AttentionPlan plan_attention(const AttentionParams& prm, FloatKind kind) {
  const Shape s = shape_of(prm, kind);
  const int64_t splits = s.work.splits;
  return AttentionPlan{splits, splits > 1 ? splits * prm.B * prm.Hq * prm.Lq * (prm.D + 2) : 0};
}

void launch_attention(const AttentionParams& prm, FloatKind kind, const AttentionPlan& plan, float* workspace,
                      void* stream) {
  if (prm.D > kAttentionMaxHeadDim) throw std::invalid_argument("fastar.attention: head dim above 256");
  Shape s = shape_of(prm, kind);
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
  const dim3 grid(static_cast<unsigned>(s.items), static_cast<unsigned>(w.splits));
  if (s.tc) {
    (prm.kv_quantized ? cuda::launch_attention_tc_quantized : cuda::launch_attention_tc)(prm, kind, w, grid, st);
  } else if (s.vec_decode) {
    (prm.kivi_bits      ? cuda::launch_attention_decode_kivi
     : prm.kv_quantized ? cuda::launch_attention_decode_quantized
                        : cuda::launch_attention_decode)(prm, kind, w, grid, st);
  }
  cuda::dispatch_device_float(kind, [&](auto tag) {
    using T = decltype(tag);
    if (!s.tc && !s.vec_decode) {
      with_config(prm.D, s.decode, [&](auto cfg) {
        using C = decltype(cfg);
        auto* kernel = &cuda::attention_kernel<T, C::kDC, C::kRowsPerWarp, C::kKeySlices>;
        const int64_t smem = cuda::attn_smem_layout<C::kKeySlices, C::kRowsPerWarp>(static_cast<int>(prm.D)).bytes;
        cuda::allow_dynamic_smem(kernel, smem);
        launch_kernel(C::kDecode ? "attention_decode" : "attention_tiled", kernel, grid, dim3(cuda::kAttnThreads),
                      static_cast<size_t>(smem), st, prm, w);
      });
    }
    if (w.splits > 1) {
      launch_kernel("attention_merge", &cuda::attention_merge_kernel<T>, dim3(static_cast<unsigned>(merge_blocks)),
                    dim3(cuda::kAttnThreads), 0, st, prm, w);
    }
  });
}

}  // namespace fastar
