// Host entry points of the CUDA kernels. No torch and no CUDA headers here: the glue (.cpp, compiled by
// the host compiler) calls them with raw pointers and a stream; each .cu defines its launcher. The same
// launchers are compiled by g++ over the SIMT emulator for fastar._C_simt.
#pragma once
#include <cstdint>

#include "core/acceptance.h"
#include "core/attention.h"
#include "core/kivi_quant.h"
#include "core/kv_quant.h"
#include "core/lantern.h"
#include "core/sampling.h"
#include "core/spectr.h"

namespace fastar {

struct TreeSampleParams;  // core/tree_acceptance.h
struct CompactKvParams;   // core/compact_kv.h

// Streaming multiprocessors of the current device (the emulator: 4, so small test shapes split rows).
int multiprocessors();

// stream: a cudaStream_t (ignored by the SIMT emulator). The acceptance ops that split rows over blocks take
// `workspace`: device scratch of the bytes their *_workspace function gives (the glue allocates it).
int64_t speculative_sample_workspace(const ChainAcceptParams& prm, FloatKind kind);
void launch_speculative_sample(const ChainAcceptParams& prm, FloatKind kind, void* workspace, void* stream);
int64_t greedy_verify_workspace(const GreedyVerifyParams& prm, FloatKind kind);
void launch_greedy_verify(const GreedyVerifyParams& prm, FloatKind kind, void* workspace, void* stream);
int64_t tree_speculative_sample_workspace(const TreeSampleParams& prm, FloatKind kind);
void launch_tree_speculative_sample(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream);
int64_t tree_greedy_verify_workspace(const TreeSampleParams& prm, FloatKind kind);
void launch_tree_greedy_verify(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream);
int64_t typical_accept_workspace(const TreeSampleParams& prm, FloatKind kind);
void launch_typical_accept(const TreeSampleParams& prm, FloatKind kind, void* workspace, void* stream);
int64_t spectr_accept_workspace(const SpectrParams& prm, FloatKind kind);
void launch_spectr_accept(const SpectrParams& prm, FloatKind kind, void* workspace, void* stream);
void launch_sample_cfg(const SampleCfgParams& prm, FloatKind kind, void* stream);
void launch_quantize_kv_append(const QuantizeKvParams& prm, FloatKind kind, void* stream);
void launch_quantize_kivi_append(const KiviAppendParams& prm, FloatKind kind, void* stream);
// Moves bytes only: the caches' dtype does not matter.
void launch_compact_kv(const CompactKvParams& prm, void* stream);

// fastar.attention (cuda/attention.cu). plan_attention picks the kernel shape and the number of kv splits;
// with more than one split the glue allocates `workspace_floats` float32 for the partial results and
// passes them to launch_attention. Head dims up to kAttentionMaxHeadDim.
constexpr int64_t kAttentionMaxHeadDim = 256;
struct AttentionPlan {
  int64_t splits;
  int64_t workspace_floats;
};
AttentionPlan plan_attention(const AttentionParams& prm, FloatKind kind);
void launch_attention(const AttentionParams& prm, FloatKind kind, const AttentionPlan& plan, float* workspace,
                      void* stream);

}  // namespace fastar
