// The vector ISAs the CPU kernels are built for, and which one runs. Every source under csrc/cpu/kernels/
// is compiled once per ISA into the namespaces fastar::cpu::generic / avx2 / avx512 (CMakeLists.txt);
// the glue calls the active ISA's copy through FASTAR_CPU_DISPATCH. The active ISA is the best one the CPU
// runs, unless FASTAR_CPU_ISA (generic | avx2 | avx512) names another.
#pragma once
#include <vector>

namespace fastar::cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// The ISAs compiled into this build (generic always; avx2 and avx512 on x86-64 with GCC or Clang).
std::vector<Isa> built_isas();
// Built, and the CPU (and OS) runs its instructions.
bool isa_supported(Isa isa);
// The ISA the kernels run with. Throws c10::Error (RuntimeError) when FASTAR_CPU_ISA names an unknown ISA
// or one that this build or CPU lacks.
Isa active_isa();
// Changes the active ISA for the rest of the process (tests and benchmarks); throws like active_isa.
void set_active_isa(const char* name);

}  // namespace fastar::cpu

// Declares `decl` (a function declaration) in every ISA namespace of fastar::cpu.
#define FASTAR_CPU_DECLARE_ISA(decl) \
  namespace fastar::cpu::generic {   \
  decl;                              \
  }                                  \
  namespace fastar::cpu::avx2 {      \
  decl;                              \
  }                                  \
  namespace fastar::cpu::avx512 {    \
  decl;                              \
  }

#if defined(FASTAR_CPU_X86_ISAS)
// Calls fastar::cpu::<active ISA>::fn(args...).
#define FASTAR_CPU_DISPATCH(fn, ...)             \
  do {                                           \
    switch (::fastar::cpu::active_isa()) {       \
      case ::fastar::cpu::Isa::kAvx512:          \
        ::fastar::cpu::avx512::fn(__VA_ARGS__);  \
        break;                                   \
      case ::fastar::cpu::Isa::kAvx2:            \
        ::fastar::cpu::avx2::fn(__VA_ARGS__);    \
        break;                                   \
      default:                                   \
        ::fastar::cpu::generic::fn(__VA_ARGS__); \
    }                                            \
  } while (0)
#else
#define FASTAR_CPU_DISPATCH(fn, ...) ::fastar::cpu::generic::fn(__VA_ARGS__)
#endif
