// fastar._C_simt: importing it registers torch.ops.fastar_simt.*; it also runs the emulator's self-tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "simt/selftest.h"
#include "simt/simt.h"

PYBIND11_MODULE(_C_simt, m) {
  m.doc() = "fastar's CUDA kernels run on the CPU by the SIMT emulator (tests only)";
  m.def("selftest", &fastar::simt::run_selftest, "Run one emulator self-test kernel and return its numbers.");
  m.def("selftest_names", &fastar::simt::selftest_names);
  m.def("mma_fragments", &fastar::simt::mma_fragments, "One mma.m16n8k16 per problem from per-lane fragments.");
  m.def("ldmatrix", &fastar::simt::ldmatrix_probe, "ldmatrix over a shared-memory image; returns the registers.");
  m.def("mma_tile", &fastar::simt::mma_tile, "A 16x8x16 product through cp.async, ldmatrix and mma.");
  m.def("set_schedule", &fastar::simt::set_schedule,
        "Order of later launches' ready threads: 'forward', 'reverse' or 'shuffle:<seed>' (ValueError otherwise).");
  m.def("schedule", &fastar::simt::schedule);
  m.def("set_race_check", &fastar::simt::set_race_check,
        "Later launches raise RuntimeError when two threads write one shared-memory word between barriers.");
  m.def("race_check", &fastar::simt::race_check);
  m.def("launch_counts", &fastar::simt::launch_counts, "Launches per kernel name since reset_launch_counts().");
  m.def("reset_launch_counts", &fastar::simt::reset_launch_counts);
  m.attr("cuda_include_dirs") = FASTAR_CUDA_INCLUDE_DIRS_STR;  // ':'-separated, as the build found them
}
