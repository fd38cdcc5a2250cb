// The Python module fastar._C: importing it registers the ops (torch.ops.fastar.*); it also tells what
// this build contains.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "core/philox.h"

#if defined(FASTAR_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace py = pybind11;

// The torch version of this build, found by fastar/_loader.py in the file's bytes *before* loading it:
// loading an extension built for another torch fails with an undefined-symbol error instead.
extern "C" __attribute__((used)) const char fastar_torch_version_marker[] =
    "fastar-built-with-torch:" FASTAR_TORCH_VERSION;

namespace {

std::vector<std::string> cpu_isa() {
  std::vector<std::string> isa;
#if defined(__AVX__)
  isa.push_back("avx");
#endif
#if defined(__AVX2__)
  isa.push_back("avx2");
#endif
#if defined(__FMA__)
  isa.push_back("fma");
#endif
#if defined(__AVX512F__)
  isa.push_back("avx512f");
#endif
#if defined(__AVX512BF16__)
  isa.push_back("avx512bf16");
#endif
#if defined(__ARM_NEON)
  isa.push_back("neon");
#endif
  return isa;
}

py::dict build_info() {
  py::dict d;
  d["torch_version"] = FASTAR_TORCH_VERSION;
#if defined(FASTAR_WITH_CUDA)
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
#endif
  d["cuda_archs"] = std::string(FASTAR_CUDA_ARCHS_STR);
  d["cpu_flags"] = std::string(FASTAR_CPU_FLAGS_STR);
  d["cpu_isa"] = cpu_isa();
  bool simt = false;
  try {
    py::module_::import("fastar._C_simt");
    simt = true;
  } catch (const py::error_already_set&) {
  }
  d["simt"] = simt;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastar's compiled kernels (ops are registered as torch.ops.fastar.*)";
  m.def("build_info", &build_info,
        "What this build contains: torch version built against, CUDA version and archs, CPU ISA flags, "
        "whether the CUDA kernels and the SIMT emulation build are present.");
  m.def(
      "philox4x32_10",
      [](std::vector<uint32_t> ctr, uint32_t k0, uint32_t k1) {
        if (ctr.size() != 4) throw py::value_error("ctr must hold 4 words");
        const fastar::Philox4x32 r = fastar::philox4x32_10(fastar::Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, k0, k1);
        return std::vector<uint32_t>(r.v, r.v + 4);
      },
      "The Philox4x32-10 block function the sampling kernels use (exposed for known-answer tests).");
}
