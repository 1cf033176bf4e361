// AVX2 + FMA kernels (compiled with -mavx2 -mfma only). 6 x 16 register tile: 12 accumulators + 2 B
// vectors + 1 broadcast of the 16 ymm registers.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/elementwise_impl.h"
#include "kernels/act_dots_impl.h"

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

// Up to V full vectors of 8 columns, one FMA chain per vector, k in order.
template <int V>
inline void row_group_avx2(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (index_t k = 0; k < kc; ++k, b += rs_b) {
    const __m256 ak = _mm256_broadcast_ss(a + k);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(ak, _mm256_loadu_ps(b + 8 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) {
    if (accumulate) acc[v] = _mm256_add_ps(_mm256_loadu_ps(c + 8 * v), acc[v]);
    _mm256_storeu_ps(c + 8 * v, acc[v]);
  }
}

// Groups of 8 vectors (64 columns): independent chains cover the FMA latency; columns past the last multiple
// of 8 one lane at a time (the same fused multiply-adds).
void row_kernel_avx2(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate, int n) {
  int j0 = 0;
  for (; j0 + 8 <= n; j0 += 64) {
    switch (std::min(64, n - j0) / 8) {
      case 1: row_group_avx2<1>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 2: row_group_avx2<2>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 3: row_group_avx2<3>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 4: row_group_avx2<4>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 5: row_group_avx2<5>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 6: row_group_avx2<6>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      case 7: row_group_avx2<7>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
      default: row_group_avx2<8>(kc, a, b + j0, rs_b, c + j0, accumulate); break;
    }
  }
  for (int j = n - n % 8; j < n; ++j) {
    float acc = 0.0f;
    for (index_t k = 0; k < kc; ++k) acc = __builtin_fmaf(a[k], b[k * rs_b + j], acc);
    c[j] = accumulate ? c[j] + acc : acc;
  }
}

// 8 rows in the 8 lanes: 8 x 8 blocks transposed in registers (unpack, shuffle, 128-bit permute: 24
// shuffles per 64 floats), then one FMA per k with q[k] broadcast, k in order: the micro-kernel's
// fmadd(a(i, k), b(k, j), acc) chain per row. Rows past `rows` in the last block repeat its last row
// (read, never stored); k past a multiple of 8 is added one gathered column at a time.
void chain_dots_avx2(index_t kc, const float* x, index_t ld, index_t rows, const float* q, float* out,
                     bool accumulate) {
  for (index_t r0 = 0; r0 < rows; r0 += 8) {
    const int nr = static_cast<int>(rows - r0 < 8 ? rows - r0 : 8);
    const float* p[8];
    for (int i = 0; i < 8; ++i) p[i] = x + (r0 + (i < nr ? i : nr - 1)) * ld;
    __m256 acc = _mm256_setzero_ps();
    index_t k0 = 0;
    for (; k0 + 8 <= kc; k0 += 8) {
      const __m256 t0 = _mm256_unpacklo_ps(_mm256_loadu_ps(p[0] + k0), _mm256_loadu_ps(p[1] + k0));
      const __m256 t1 = _mm256_unpackhi_ps(_mm256_loadu_ps(p[0] + k0), _mm256_loadu_ps(p[1] + k0));
      const __m256 t2 = _mm256_unpacklo_ps(_mm256_loadu_ps(p[2] + k0), _mm256_loadu_ps(p[3] + k0));
      const __m256 t3 = _mm256_unpackhi_ps(_mm256_loadu_ps(p[2] + k0), _mm256_loadu_ps(p[3] + k0));
      const __m256 t4 = _mm256_unpacklo_ps(_mm256_loadu_ps(p[4] + k0), _mm256_loadu_ps(p[5] + k0));
      const __m256 t5 = _mm256_unpackhi_ps(_mm256_loadu_ps(p[4] + k0), _mm256_loadu_ps(p[5] + k0));
      const __m256 t6 = _mm256_unpacklo_ps(_mm256_loadu_ps(p[6] + k0), _mm256_loadu_ps(p[7] + k0));
      const __m256 t7 = _mm256_unpackhi_ps(_mm256_loadu_ps(p[6] + k0), _mm256_loadu_ps(p[7] + k0));
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      // column c of the block (k0 + c) across the 8 rows
      const __m256 col[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                             _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                             _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                             _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) acc = _mm256_fmadd_ps(col[c], _mm256_broadcast_ss(q + k0 + c), acc);
    }
    for (; k0 < kc; ++k0) {
      const __m256 col = _mm256_setr_ps(p[0][k0], p[1][k0], p[2][k0], p[3][k0], p[4][k0], p[5][k0], p[6][k0], p[7][k0]);
      acc = _mm256_fmadd_ps(col, _mm256_broadcast_ss(q + k0), acc);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, acc);
    for (int i = 0; i < nr; ++i) out[r0 + i] = accumulate ? out[r0 + i] + sums[i] : sums[i];
  }
}

}  // namespace

const KernelSet& kernels_avx2() {
  static const KernelSet set{Isa::Avx2, kMr, kNr, 256, 144, 2048, ukernel_avx2_6x16, row_kernel_avx2, pack_panel<kMr>,
                             pack_panel<kNr>, epilogue_impl,
                             activate_impl, row_sum_impl, update_impl,
                             sum_squares_impl, dot_rows_impl, exp_shift_impl, chain_dots_avx2, act_dots_impl,
                             dropout_row_impl, att_transpose_impl, att_rows_cols_impl, att_weights_rows_impl,
                             att_weights_t_rows_impl, layer_norm_impl,
                             layer_norm_backward_impl, fill_normal_impl,
                             standardize_rows_impl<float>, standardize_rows_impl<double>};
  return set;
}

}  // namespace fastrec
