// The sequential model's bf16 weight gradients (kernels.h, seq_bf16_weight_gradient_avx512): C = Xᵀ dY over a
// batch's ~5,800 event rows with C only 64 x 64..192, where bf16_gemm's transposed-A path spent more time
// packing 12-row A panels and 32-column B panels (one rounding loop per element) than in VDPBF16PS. Here each
// K block of X and dY is converted once, full width, by VCVTNE2PS2BF16 (two rows of 16 floats to one register
// of pair words), and 6 x 64 register tiles (24 accumulators, 4 B vectors per pair) read the pair rows in place.
// X and dY are whole-batch arrays (MBs) read from L3 or memory: the conversion's time was the wait for them, so
// it prefetches rows ahead (that, not the cheaper rounding, is what made it faster: benchmarks/SEQUENTIAL.md).
// Compiled with the bf16 kernels' flags only; called only when isa.h's bf16_native_available() holds.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/bf16_avx512_impl.h"

namespace fastrec {
namespace {

constexpr int kTileRows = 6, kTileVecs = 4;  // 6 x 64 outputs per tile
constexpr index_t kPrefetchRows = 16;

// rows k0 .. k0 + kc - 1 of src (columns 0 .. cols - 1, row stride ld) as pair rows: out[kp * ld_out + c] =
// (bf16 src[k0 + 2kp][c], bf16 src[k0 + 2kp + 1][c]) (zero high half past kc), columns up to ld_out (a multiple
// of 16) zero. sums (optional, ld_out floats): sums[c] += src[k][c] for each row k in order, in float32.
void convert_pairs(const float* src, index_t ld, index_t kc, index_t cols, std::uint32_t* out, index_t ld_out,
                   float* sums) {
  const __m512i interleave = pair_interleave();
  for (index_t k = 0; k < kc; k += 2, out += ld_out) {
    const float* lo = src + k * ld;
    const float* hi = lo + ld;
    const bool has_hi = k + 1 < kc;
    // the rows kPrefetchRows ahead into L1: X and dY are whole-batch arrays (MBs), read from L3 or memory
    if (k + kPrefetchRows + 1 < kc)
      for (index_t c = 0; c < cols; c += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(lo + kPrefetchRows * ld + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(hi + kPrefetchRows * ld + c), _MM_HINT_T0);
      }
    for (index_t c = 0; c < ld_out; c += 16) {
      const __mmask16 m = lanes(cols - c);
      const __m512 x0 = _mm512_maskz_loadu_ps(m, lo + c);
      const __m512 x1 = has_hi ? _mm512_maskz_loadu_ps(m, hi + c) : _mm512_setzero_ps();
      _mm512_storeu_si512(out + c, pair_words(x0, x1, interleave));
      if (sums) {
        __m512 sc = _mm512_add_ps(_mm512_loadu_ps(sums + c), x0);
        if (has_hi) sc = _mm512_add_ps(sc, x1);
        _mm512_storeu_ps(sums + c, sc);
      }
    }
  }
}

// C rows i < MR (MR <= kTileRows), columns of NV vectors (the last one `n_last` wide): acc = sum over kp in
// order of VDPBF16PS(a(i, kp) broadcast, b(kp, :)), as bf16_gemm's tile; then C = acc (first) or C = C + acc.
template <int MR, int NV>
void tile(index_t pairs, const std::uint32_t* a, index_t lda, const std::uint32_t* b, index_t ldb, float* c,
          index_t ldc, bool first, index_t n_last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (index_t kp = 0; kp < pairs; ++kp, a += lda, b += ldb) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v + 1 < NV ? kAll : lanes(n_last);
      float* ci = c + i * ldc + 16 * v;
      __m512 r = acc[i][v];
      if (!first) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, ci), r);
      _mm512_mask_storeu_ps(ci, m, r);
    }
}

template <int MR>
void tile_rows(index_t pairs, const std::uint32_t* a, index_t lda, const std::uint32_t* b, index_t ldb, float* c,
               index_t ldc, bool first, index_t n) {
  const index_t nv = (n + 15) / 16, n_last = n - 16 * (nv - 1);
  switch (nv) {
    case 1: return tile<MR, 1>(pairs, a, lda, b, ldb, c, ldc, first, n_last);
    case 2: return tile<MR, 2>(pairs, a, lda, b, ldb, c, ldc, first, n_last);
    case 3: return tile<MR, 3>(pairs, a, lda, b, ldb, c, ldc, first, n_last);
    default: return tile<MR, 4>(pairs, a, lda, b, ldb, c, ldc, first, n_last);
  }
}

}  // namespace

void seq_bf16_weight_gradient_avx512(index_t K, index_t kc_step, const float* X, index_t ldx, const float* dY,
                                     index_t ldy, float* C, index_t ldc, index_t m, index_t n, std::uint32_t* xbuf,
                                     std::uint32_t* ybuf, float* col_sums) {
  const index_t ldxa = (m + 15) / 16 * 16, ldyb = (n + 15) / 16 * 16;
  // column sums: from +0, each row added in order, in whole vectors (row_sum's chains)
  float* sums = col_sums ? reinterpret_cast<float*>(ybuf + (std::min(kc_step, K) + 1) / 2 * ldyb) : nullptr;
  if (sums) std::fill(sums, sums + ldyb, 0.0f);
  for (index_t pc = 0; pc < K; pc += kc_step) {
    const index_t kc = std::min(kc_step, K - pc), pairs = (kc + 1) / 2;
    convert_pairs(X + pc * ldx, ldx, kc, m, xbuf, ldxa, nullptr);
    convert_pairs(dY + pc * ldy, ldy, kc, n, ybuf, ldyb, sums);
    for (index_t j0 = 0; j0 < n; j0 += 16 * kTileVecs) {
      const index_t nj = std::min<index_t>(16 * kTileVecs, n - j0);
      for (index_t i0 = 0; i0 < m; i0 += kTileRows) {
        const std::uint32_t* a = xbuf + i0;
        const std::uint32_t* b = ybuf + j0;
        float* c = C + i0 * ldc + j0;
        switch (std::min<index_t>(kTileRows, m - i0)) {
          case 1: tile_rows<1>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
          case 2: tile_rows<2>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
          case 3: tile_rows<3>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
          case 4: tile_rows<4>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
          case 5: tile_rows<5>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
          default: tile_rows<6>(pairs, a, ldxa, b, ldyb, c, ldc, pc == 0, nj); break;
        }
      }
    }
  }
  if (sums) std::copy(sums, sums + n, col_sums);
}

}  // namespace fastrec
