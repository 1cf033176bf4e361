// Portable kernels: compiled WITHOUT ISA flags (baseline x86-64 / any CPU). Also the oracle the SIMD
// micro-kernels are tested against. 4 x 8 register tile.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/elementwise_impl.h"
#include "kernels/act_dots_impl.h"

namespace fastrec {
namespace {

constexpr int kMr = 4, kNr = 8;

void ukernel_scalar_4x8(index_t kc, const float* a, index_t rs_a, index_t cs_a, const float* b, index_t rs_b, float* c,
                        index_t ldc, bool accumulate, int m, int n, const TileExtra* extra) {
  float acc[kMr][kNr] = {};
  SpreadPrefetch prefetch(extra, kc);
  for (index_t k0 = 0; k0 < kc;) {
    const index_t k1 = prefetch.next_stop(k0, kc);
    for (index_t k = k0; k < k1; ++k, b += rs_b)
      for (int i = 0; i < kMr; ++i) {
        const float ai = a[i * rs_a + k * cs_a];
        for (int j = 0; j < kNr; ++j) acc[i][j] += ai * b[j];
      }
    k0 = k1;
  }
  prefetch.rest();
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
  if (extra) finish_tile(c, ldc, m, n, *extra);
}

void row_kernel_scalar(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate, int n) {
  for (int j0 = 0; j0 < n; j0 += kNr) {  // kNr columns at a time, as the micro-kernel's panels
    const int w = n - j0 < kNr ? n - j0 : kNr;
    float acc[kNr] = {};
    const float* bk = b + j0;
    for (index_t k = 0; k < kc; ++k, bk += rs_b)
      for (int j = 0; j < w; ++j) acc[j] += a[k] * bk[j];
    for (int j = 0; j < w; ++j) c[j0 + j] = accumulate ? c[j0 + j] + acc[j] : acc[j];
  }
}

// One chain per row, `acc += x * q` as the 4 x 8 micro-kernel's `acc[i][j] += ai * b[j]` (no FMA here).
void chain_dots_scalar(index_t kc, const float* x, index_t ld, index_t rows, const float* q, float* out,
                       bool accumulate) {
  for (index_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    float acc = 0.0f;
    for (index_t k = 0; k < kc; ++k) acc += xr[k] * q[k];
    out[r] = accumulate ? out[r] + acc : acc;
  }
}

}  // namespace

const KernelSet& kernels_scalar() {
  static const KernelSet set{Isa::Scalar, kMr, kNr, 256, 128, 2048, ukernel_scalar_4x8, row_kernel_scalar, pack_panel<kMr>,
                             pack_panel<kNr>, epilogue_impl,
                             activate_impl, row_sum_impl, update_impl,
                             sum_squares_impl, dot_rows_impl, exp_shift_impl, chain_dots_scalar, act_dots_impl,
                             dropout_row_impl, att_transpose_impl, att_rows_cols_impl, att_weights_rows_impl,
                             att_weights_t_rows_impl, layer_norm_impl,
                             layer_norm_backward_impl, fill_normal_impl,
                             standardize_rows_impl<float>, standardize_rows_impl<double>};
  return set;
}

const KernelSet& kernels_for(Isa isa) {
  switch (isa) {
#ifdef FASTREC_HAVE_X86_KERNELS
    case Isa::Avx512: return kernels_avx512();
    case Isa::Avx2: return kernels_avx2();
#endif
    default: return kernels_scalar();
  }
}

}  // namespace fastrec
