// AVX2 + FMA kernels (compiled with -mavx2 -mfma only). 6 x 16 register tile: 12 accumulators + 2 B
// vectors + 1 broadcast of the 16 ymm registers.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/elementwise_impl.h"

namespace fastrec {
namespace {

constexpr int kMr = 6, kNr = 16;

// a(i, k) = a[i * rs_a + k * cs_a]; kRowMajor specialises cs_a == 1 (A read in place), else rs_a == 1.
template <bool kRowMajor>
void fma_loop(index_t kc, const float* a, index_t stride, const float* b, index_t rs_b, __m256 (&acc0)[kMr],
              __m256 (&acc1)[kMr], SpreadPrefetch& prefetch) {
  const float* rows[kMr];
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) rows[i] = a + i * (kRowMajor ? stride : 1);
  for (index_t k0 = 0; k0 < kc;) {
    const index_t k1 = prefetch.next_stop(k0, kc);
    for (index_t k = k0; k < k1; ++k, b += rs_b) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      const index_t off = kRowMajor ? k : k * stride;
#pragma GCC unroll 6
      for (int i = 0; i < kMr; ++i) {
        const __m256 ai = _mm256_broadcast_ss(rows[i] + off);
        acc0[i] = _mm256_fmadd_ps(ai, b0, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(ai, b1, acc1[i]);
      }
    }
    k0 = k1;
  }
}

void ukernel_avx2_6x16(index_t kc, const float* a, index_t rs_a, index_t cs_a, const float* b, index_t rs_b, float* c,
                       index_t ldc, bool accumulate, int m, int n, const TileExtra* extra) {
  __m256 acc0[kMr], acc1[kMr];
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  SpreadPrefetch prefetch(extra, kc);
  if (cs_a == 1)
    fma_loop<true>(kc, a, rs_a, b, rs_b, acc0, acc1, prefetch);
  else
    fma_loop<false>(kc, a, cs_a, b, rs_b, acc0, acc1, prefetch);
  prefetch.rest();
  if (m == kMr && n == kNr) {
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) {
      float* ci = c + i * ldc;
      __m256 r0 = acc0[i], r1 = acc1[i];
      if (accumulate) {
        r0 = _mm256_add_ps(_mm256_loadu_ps(ci), r0);
        r1 = _mm256_add_ps(_mm256_loadu_ps(ci + 8), r1);
      }
      _mm256_storeu_ps(ci, r0);
      _mm256_storeu_ps(ci + 8, r1);
    }
    if (extra) finish_tile(c, ldc, m, n, *extra);
    return;
  }
  alignas(32) float tile[kMr][kNr];  // edge tile: through a small temporary
  for (int i = 0; i < kMr; ++i) {
    _mm256_store_ps(tile[i], acc0[i]);
    _mm256_store_ps(tile[i] + 8, acc1[i]);
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
  if (extra) finish_tile(c, ldc, m, n, *extra);
}

void row_kernel_avx2(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate, int n) {
  if (n == kNr) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (index_t k = 0; k < kc; ++k, b += rs_b) {
      const __m256 ak = _mm256_broadcast_ss(a + k);
      acc0 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(b), acc0);
      acc1 = _mm256_fmadd_ps(ak, _mm256_loadu_ps(b + 8), acc1);
    }
    if (accumulate) {
      acc0 = _mm256_add_ps(_mm256_loadu_ps(c), acc0);
      acc1 = _mm256_add_ps(_mm256_loadu_ps(c + 8), acc1);
    }
    _mm256_storeu_ps(c, acc0);
    _mm256_storeu_ps(c + 8, acc1);
    return;
  }
  for (int j = 0; j < n; ++j) {  // a partial panel: the same fused multiply-adds one lane at a time
    float acc = 0.0f;
    for (index_t k = 0; k < kc; ++k) acc = __builtin_fmaf(a[k], b[k * rs_b + j], acc);
    c[j] = accumulate ? c[j] + acc : acc;
  }
}

}  // namespace

const KernelSet& kernels_avx2() {
  static const KernelSet set{Isa::Avx2, kMr, kNr, 256, 144, 2048, ukernel_avx2_6x16, row_kernel_avx2, pack_panel<kMr>,
                             pack_panel<kNr>, epilogue_impl,
                             activate_impl, row_sum_impl, update_impl,
                             sum_squares_impl, dot_rows_impl};
  return set;
}

}  // namespace fastrec
