// Run-time choice of the CPU kernels' ISA (cpu/isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace fastar::cpu {
namespace {

bool cpu_runs(Isa isa) {
#if defined(FASTAR_CPU_X86_ISAS)
  // __builtin_cpu_supports checks the OS saves the wider registers too (XCR0).
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_runs(Isa::kAvx2);
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

Isa parse(const char* name, const char* source) {
  for (Isa isa : built_isas()) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      TORCH_CHECK(cpu_runs(isa), "fastar: ", source, " asks for the ", name,
                  " CPU kernels, but this CPU does not support ", name);
      return isa;
    }
  }
  std::string known;
  for (Isa isa : built_isas()) known += std::string(known.empty() ? "" : ", ") + isa_name(isa);
  TORCH_CHECK(false, "fastar: ", source, " = '", name, "' is not an ISA of this build (", known, ")");
}

Isa best() {
  Isa pick = Isa::kGeneric;
  for (Isa isa : built_isas())
    if (cpu_runs(isa)) pick = isa;
  return pick;
}

std::atomic<int> g_active{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

std::vector<Isa> built_isas() {
#if defined(FASTAR_CPU_X86_ISAS)
  return {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512};
#else
  return {Isa::kGeneric};
#endif
}

bool isa_supported(Isa isa) {
  for (Isa b : built_isas())
    if (b == isa) return cpu_runs(isa);
  return false;
}

Isa active_isa() {
  int cur = g_active.load(std::memory_order_relaxed);
  if (cur < 0) {
    const char* env = std::getenv("FASTAR_CPU_ISA");
    cur = static_cast<int>(env && *env ? parse(env, "FASTAR_CPU_ISA") : best());
    g_active.store(cur, std::memory_order_relaxed);
  }
  return static_cast<Isa>(cur);
}

void set_active_isa(const char* name) {
  g_active.store(static_cast<int>(parse(name, "set_cpu_isa")), std::memory_order_relaxed);
}

}  // namespace fastar::cpu
