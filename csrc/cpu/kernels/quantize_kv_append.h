// The CPU kernel of fastar.quantize_kv_append, one per ISA (cpu/isa.h). Sets *bad_row to -1 once every row is
// written, or, writing nothing, to the first (token * kv_heads + head) * 2 + (0 for K, 1 for V) whose row holds
// NaN or Inf. Slot ids must have been checked.
#pragma once
#include <cstdint>

#include "core/dtype.h"
#include "core/kv_quant.h"
#include "cpu/isa.h"

FASTAR_CPU_DECLARE_ISA(void quantize_kv_append(const ::fastar::QuantizeKvParams& prm, ::fastar::FloatKind kind,
                                               int64_t* bad_row))
