// fastar._C_simt: importing it registers torch.ops.fastar_simt.*; it also runs the emulator's self-tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "simt/selftest.h"

PYBIND11_MODULE(_C_simt, m) {
  m.doc() = "fastar's CUDA kernels run on the CPU by the SIMT emulator (tests only)";
  m.def("selftest", &fastar::simt::run_selftest, "Run one emulator self-test kernel and return its numbers.");
  m.def("selftest_names", &fastar::simt::selftest_names);
}
