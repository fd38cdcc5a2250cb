// The CPU attention kernel's entry, one per ISA (cpu/isa.h): runs the attention of p into p.out and p.lse.
#pragma once
#include "core/attention.h"
#include "core/dtype.h"
#include "cpu/isa.h"

FASTAR_CPU_DECLARE_ISA(void attention(const ::fastar::AttentionParams& p, ::fastar::FloatKind kind))
