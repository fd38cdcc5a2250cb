// The Python module fastar._C: importing it registers the ops (torch.ops.fastar.*); it also tells what
// this build contains.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "core/acceptance.h"
#include "core/philox.h"
#include "cpu/isa.h"

#if defined(FASTAR_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace py = pybind11;

// The torch version of this build, found by fastar/_loader.py in the file's bytes *before* loading it:
// loading an extension built for another torch fails with an undefined-symbol error instead.
extern "C" __attribute__((used)) const char fastar_torch_version_marker[] =
    "fastar-built-with-torch:" FASTAR_TORCH_VERSION;

namespace {

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
  d["cpu_isa"] = fastar::cpu::isa_name(fastar::cpu::active_isa());
  std::vector<std::string> built, supported;
  for (fastar::cpu::Isa isa : fastar::cpu::built_isas()) {
    built.push_back(fastar::cpu::isa_name(isa));
    if (fastar::cpu::isa_supported(isa)) supported.push_back(fastar::cpu::isa_name(isa));
  }
  d["cpu_isas_built"] = built;
  d["cpu_isas_supported"] = supported;
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
        "What this build contains: torch version built against, CUDA version and archs, the CPU kernels' "
        "ISAs (built, run by this CPU, active), whether the CUDA kernels and the SIMT emulation build are "
        "present.");
  m.def("describe_status", &fastar::accept::describe_status,
        "The meaning of an acceptance row status (the bits of -num_accepted of a marked row).");
  m.def(
      "_set_cpu_isa", [](const std::string& name) { fastar::cpu::set_active_isa(name.c_str()); },
      "Runs the CPU kernels with another ISA from now on (generic, avx2, avx512; tests and benchmarks).");
  m.def(
      "philox4x32_10",
      [](std::vector<uint32_t> ctr, uint32_t k0, uint32_t k1) {
        if (ctr.size() != 4) throw py::value_error("ctr must hold 4 words");
        const fastar::Philox4x32 r =
            fastar::philox4x32_10(fastar::Philox4x32{{ctr[0], ctr[1], ctr[2], ctr[3]}}, k0, k1);
        return std::vector<uint32_t>(r.v, r.v + 4);
      },
      "The Philox4x32-10 block function the sampling kernels use (exposed for known-answer tests).");
}
