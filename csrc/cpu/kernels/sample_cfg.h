// The CPU sample_cfg kernel's entry, one per ISA (cpu/isa.h): writes prm.tokens and the status of every
// (row, position), row-major, into status (kOk, or why that position's logits are invalid).
#pragma once
#include <cstdint>

#include "core/dtype.h"
#include "core/sampling.h"
#include "cpu/isa.h"

FASTAR_CPU_DECLARE_ISA(void sample_cfg(const ::fastar::SampleCfgParams& prm, ::fastar::FloatKind kind, int32_t* status))
