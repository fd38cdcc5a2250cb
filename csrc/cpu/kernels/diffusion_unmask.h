// The CPU diffusion_unmask scoring kernel's entry, one per ISA (cpu/isa.h): the candidate and confidence of
// every position of the current block (prm.candidates, prm.confidence) and its status (prm.status).
#pragma once
#include <cstdint>

#include "core/diffusion.h"
#include "core/dtype.h"
#include "cpu/isa.h"

FASTAR_CPU_DECLARE_ISA(void diffusion_scores(const ::fastar::DiffusionUnmaskParams& prm, ::fastar::FloatKind kind))
