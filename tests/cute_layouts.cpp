// Prints CuTe's statement of the sm_80 mma.m16n8k16 fragment layouts and the sm_75 ldmatrix layouts, evaluated on
// the host, for tests/test_simt_mma.py. One line per (thread, value):
//   A t v m k | B t v k n | C t v m n         (MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>, (thread, value) -> coord)
//   DST name t reg half matrix row col        (Copy_Traits<..LDSM..>::DstLayout: the 16-bit element a lane receives)
//   SRC name t matrix row                     (Copy_Traits<..LDSM..>::SrcLayout: the row whose address a lane gives)
// Matrix coordinates are those of the rows in shared memory (for .trans too).
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include <cstdio>

using namespace cute;

template <class Copy>
void print_ldsm(const char* name, int regs) {
  using Traits = Copy_Traits<Copy>;
  const auto dst = typename Traits::DstLayout{};
  const auto src = typename Traits::SrcLayout{};
  for (int t = 0; t < 32; ++t) {
    for (int r = 0; r < regs; ++r)
      for (int h = 0; h < 2; ++h) {
        const int bit = int(dst(t, 32 * r + 16 * h));  // 8 rows of 128 bits per matrix
        std::printf("DST %s %d %d %d %d %d %d\n", name, t, r, h, bit / 1024, bit / 128 % 8, bit / 16 % 8);
      }
    const int row = int(src(t, 0)) / 128;
    std::printf("SRC %s %d %d %d\n", name, t, row / 8, row % 8);
  }
}

int main() {
  using Mma = MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>;
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < 8; ++v) {
      const int i = int(typename Mma::ALayout{}(t, v));  // (M16, K16) column-major
      std::printf("A %d %d %d %d\n", t, v, i % 16, i / 16);
    }
    for (int v = 0; v < 4; ++v) {
      const int i = int(typename Mma::BLayout{}(t, v));  // (N8, K16) column-major
      std::printf("B %d %d %d %d\n", t, v, i / 8, i % 8);
    }
    for (int v = 0; v < 4; ++v) {
      const int i = int(typename Mma::CLayout{}(t, v));  // (M16, N8) column-major
      std::printf("C %d %d %d %d\n", t, v, i % 16, i / 16);
    }
  }
  print_ldsm<SM75_U32x1_LDSM_N>("x1", 1);
  print_ldsm<SM75_U32x2_LDSM_N>("x2", 2);
  print_ldsm<SM75_U32x4_LDSM_N>("x4", 4);
  print_ldsm<SM75_U16x2_LDSM_T>("x1_trans", 1);
  print_ldsm<SM75_U16x4_LDSM_T>("x2_trans", 2);
  print_ldsm<SM75_U16x8_LDSM_T>("x4_trans", 4);
  return 0;
}
