// The CPU acceptance kernels' entries, one per ISA (cpu/isa.h): fill prm.tokens and prm.num_accepted
// (a negative count marks an invalid row, core/acceptance.h).
#pragma once
#include "core/acceptance.h"
#include "core/dtype.h"
#include "core/lantern.h"
#include "core/tree_acceptance.h"
#include "cpu/isa.h"

FASTAR_CPU_DECLARE_ISA(void speculative_sample(const ::fastar::ChainAcceptParams& prm, ::fastar::FloatKind kind))
FASTAR_CPU_DECLARE_ISA(void greedy_verify(const ::fastar::GreedyVerifyParams& prm, ::fastar::FloatKind kind))
FASTAR_CPU_DECLARE_ISA(void tree_speculative_sample(const ::fastar::TreeSampleParams& prm, ::fastar::FloatKind kind))
FASTAR_CPU_DECLARE_ISA(void tree_greedy_verify(const ::fastar::TreeSampleParams& prm, ::fastar::FloatKind kind))
FASTAR_CPU_DECLARE_ISA(void typical_accept(const ::fastar::TreeSampleParams& prm, ::fastar::FloatKind kind))
