// AVX-512 kernels (compiled with -mavx512f/dq/vl/bw -mfma only). 8 x 32 register tile: 16 accumulators,
// 2 B vectors, A broadcast from memory; 16 FMAs per k keep both FMA ports busy (8 cycles) while the 10
// loads fit the load ports. kc = 256 keeps the 32 KiB B panel (256 x 32 floats) in L1.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/elementwise_impl.h"

namespace fastrec {
namespace {

constexpr int kMr = 12, kNr = 32;

// Lane masks of the two 16-float halves of an n-column tile.
__mmask16 mask0_of(int n) { return static_cast<__mmask16>((1u << (n < 16 ? n : 16)) - 1u); }
__mmask16 mask1_of(int n) { return static_cast<__mmask16>((1u << (n > 16 ? n - 16 : 0)) - 1u); }

// One k step: acc(i, :) += a(i) * [b0 b1] for the MR rows, a(i) read at row(i); with kHalf (a tile of at
// most 16 columns) only the first half, as the full step computes it.
template <bool kHalf, typename Row>
inline void fma_step(Row row, __m512 b0, __m512 b1, __m512 (&acc0)[kMr], __m512 (&acc1)[kMr]) {
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i) {
    const __m512 ai = _mm512_set1_ps(row(i));
    acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
    if (!kHalf) acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
  }
}

// The FMA loop. A is read in place with strides: a(i, k) = a[i * rs_a + k * cs_a]. Packed panels have
// rs_a = 1, cs_a = MR; a row-major A read without packing (no transpose copy) has rs_a = lda, cs_a = 1.
// Row-major rows are reached from three pointers (rows 0-3, 4-7, 8-11) plus 0, 1, 2 or 3 strides, which
// x86 addressing modes scale for free: twelve row pointers would not fit in the registers and spill.
template <bool kRowMajor, bool kHalf>
void fma_loop(index_t kc, const float* a, index_t stride, const float* b, index_t rs_b, __m512 (&acc0)[kMr],
              __m512 (&acc1)[kMr], SpreadPrefetch& prefetch) {
  const index_t s1 = stride, s2 = 2 * stride, s3 = 3 * stride;
  const float *p0 = a, *p1 = a + 4 * stride, *p2 = a + 8 * stride;
  for (index_t k0 = 0; k0 < kc;) {
    const index_t k1 = prefetch.next_stop(k0, kc);
    for (index_t k = k0; k < k1; ++k, b += rs_b) {
      const __m512 b0 = _mm512_loadu_ps(b), b1 = kHalf ? b0 : _mm512_loadu_ps(b + 16);
      if (kRowMajor) {
        fma_step<kHalf>([&](int i) {
          const float* p = i < 4 ? p0 : i < 8 ? p1 : p2;
          const int r = i & 3;
          return r == 0 ? p[0] : r == 1 ? p[s1] : r == 2 ? p[s2] : p[s3];
        }, b0, b1, acc0, acc1);
        ++p0, ++p1, ++p2;
      } else {
        fma_step<kHalf>([&](int i) { return p0[i]; }, b0, b1, acc0, acc1);
        p0 += stride;
      }
    }
    k0 = k1;
  }
}

// e^x on 16 lanes: expf_vec's reduction (x = n ln2 + r, round to nearest) and polynomial, with the 2^n
// scaling by vscalefps; -87 floors x, NaN stays NaN (max returns its second operand for NaN).
inline __m512 exp512(__m512 x) {
  const __mmask16 all = 0xFFFF;
  x = _mm512_maskz_max_ps(all, _mm512_set1_ps(-87.0f), x);
  x = _mm512_maskz_min_ps(all, _mm512_set1_ps(88.0f), x);
  const __m512 n = _mm512_maskz_roundscale_ps(all, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(all, p, n);
}

// The 16 lanes' sum in a fixed order (halves, quarters, pairs). Masked / hand-written forms: GCC 12's
// _mm512_reduce_add_ps and unmasked roundscale trip a false -Wmaybe-uninitialized (see the micro-kernel's max).
inline float sum16(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xFF, v, 0), _mm512_maskz_extractf32x8_ps(0xFF, v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_shuffle_ps(e, e, 1)));
}

void ukernel_avx512(index_t kc, const float* a, index_t rs_a, index_t cs_a, const float* b, index_t rs_b, float* c, index_t ldc,
                    bool accumulate, int m, int n, const TileExtra* extra) {
  __m512 acc0[kMr], acc1[kMr];
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  SpreadPrefetch prefetch(extra, kc);
  // A tile of at most 16 columns (the last panel of N = 80, say) runs half the FMAs.
  if (cs_a == 1)
    n <= 16 ? fma_loop<true, true>(kc, a, rs_a, b, rs_b, acc0, acc1, prefetch)
            : fma_loop<true, false>(kc, a, rs_a, b, rs_b, acc0, acc1, prefetch);
  else
    n <= 16 ? fma_loop<false, true>(kc, a, cs_a, b, rs_b, acc0, acc1, prefetch)
            : fma_loop<false, false>(kc, a, cs_a, b, rs_b, acc0, acc1, prefetch);
  prefetch.rest();
  // Scale, bias, ReLU and the ReLU derivative mask in registers; other activations after the store (they
  // need the vectorised exp loop).
  const float scale = extra ? extra->scale : 1.0f;
  const float* bias = extra ? extra->bias : nullptr;
  const bool relu = extra && extra->act == Activation::Relu;
  const bool act_later = extra && !relu && extra->act != Activation::Identity;
  const bool relu_mul = extra && extra->mul && extra->mul_act == Activation::Relu && !act_later;
  const bool mul_later = extra && extra->mul && !relu_mul && extra->mul_act != Activation::Identity;
  // The Epilogue's exponentials and row sums in registers, unless an activation must be applied first.
  float* const exp_sums = extra && !act_later && !mul_later ? extra->exp_sums : nullptr;
  // Masked loads/stores handle a partial tile's columns; rows past m are simply not stored.
  const __mmask16 mask0 = mask0_of(n), mask1 = mask1_of(n);
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), vscale = _mm512_set1_ps(scale);
  const __mmask16 all = 0xFFFF;  // maskz_max: plain _mm512_max_ps trips a false -Wmaybe-uninitialized in GCC 12
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i) {
    if (i >= m) break;
    float* ci = c + i * ldc;
    __m512 r0 = acc0[i], r1 = acc1[i];
    if (accumulate) {
      r0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, ci), r0);
      r1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, ci + 16), r1);
    }
    if (scale != 1.0f) {
      r0 = _mm512_mul_ps(r0, vscale);
      r1 = _mm512_mul_ps(r1, vscale);
    }
    if (bias) {
      r0 = _mm512_add_ps(r0, bias0);
      r1 = _mm512_add_ps(r1, bias1);
    }
    if (relu) {  // max(v, +0) returns +0 for NaN and -0, as apply_act's v > 0 ? v : 0 does
      r0 = _mm512_maskz_max_ps(all, r0, zero);
      r1 = _mm512_maskz_max_ps(all, r1, zero);
    }
    if (relu_mul) {  // v *= (a > 0 ? 1 : 0), a multiplication as in the epilogue (so inf * 0 stays NaN)
      const float* a = extra->mul + i * extra->ld_mul;
      r0 = _mm512_mul_ps(r0, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(mask0, a), zero, _CMP_GT_OQ), one));
      r1 = _mm512_mul_ps(r1, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(mask1, a + 16), zero, _CMP_GT_OQ), one));
    }
    if (exp_sums) {  // the columns past n (zero-padded B) must not count
      r0 = exp512(r0);
      r1 = exp512(r1);
      exp_sums[i * extra->ld_sums] =
          sum16(_mm512_add_ps(_mm512_maskz_mov_ps(mask0, r0), _mm512_maskz_mov_ps(mask1, r1)));
    }
    _mm512_mask_storeu_ps(ci, mask0, r0);
    _mm512_mask_storeu_ps(ci + 16, mask1, r1);
  }
  if (act_later || mul_later) {  // the rest of the epilogue on the stored tile
    TileExtra rest;  // scale and bias are done; the mask waits for the activation
    rest.act = act_later ? extra->act : Activation::Identity;
    rest.mul = mul_later ? extra->mul : nullptr;
    rest.ld_mul = extra->ld_mul;
    rest.mul_act = extra->mul_act;
    rest.exp_sums = extra->exp_sums;  // not done in registers here
    rest.ld_sums = extra->ld_sums;
    finish_tile(c, ldc, m, n, rest);
  }
}

void row_kernel_avx512(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate, int n) {
  const int n0 = n < 16 ? n : 16, n1 = n > 16 ? n - 16 : 0;
  const __mmask16 mask0 = static_cast<__mmask16>((1u << n0) - 1u), mask1 = static_cast<__mmask16>((1u << n1) - 1u);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (index_t k = 0; k < kc; ++k, b += rs_b) {
    const __m512 ak = _mm512_set1_ps(a[k]);
    acc0 = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(mask0, b), acc0);
    acc1 = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(mask1, b + 16), acc1);
  }
  if (accumulate) {
    acc0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, c), acc0);
    acc1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, c + 16), acc1);
  }
  _mm512_mask_storeu_ps(c, mask0, acc0);
  _mm512_mask_storeu_ps(c + 16, mask1, acc1);
}

// 16 rows in the 16 lanes: 16 x 16 blocks transposed in registers (two rounds of in-lane unpacks, two of
// 128-bit lane shuffles: 64 shuffles per 256 floats), then one FMA per k with q[k] broadcast, k in order: the
// micro-kernel's fmadd(a(i, k), b(k, j), acc) chain per row. ~7 ns per row at dim 64 on one core, the
// shuffles the limit (interleaving 4 groups' chains, or building the lanes with broadcast or insert loads
// instead of the 128-bit shuffles, measured no faster). Rows past `rows` in the last block repeat its
// last row (read, never stored); the last k block is loaded masked and only its kc - k0 columns are added.
void chain_dots_avx512(index_t kc, const float* x, index_t ld, index_t rows, const float* q, float* out,
                       bool accumulate) {
  // Masked forms with all lanes on: the plain unpack / shuffle intrinsics trip a false
  // -Wmaybe-uninitialized in GCC 12 (as _mm512_max_ps does in the micro-kernel).
  const __mmask16 all = 0xFFFF;
  const __mmask8 all8 = 0xFF;
  for (index_t r0 = 0; r0 < rows; r0 += 16) {
    const int nr = static_cast<int>(rows - r0 < 16 ? rows - r0 : 16);
    const float* p[16];
    for (int i = 0; i < 16; ++i) p[i] = x + (r0 + (i < nr ? i : nr - 1)) * ld;
    __m512 acc = _mm512_setzero_ps();
    for (index_t k0 = 0; k0 < kc; k0 += 16) {
      const int rem = static_cast<int>(kc - k0 < 16 ? kc - k0 : 16);
      const __mmask16 km = static_cast<__mmask16>((1u << rem) - 1u);
      __m512 t[16], u[16];
#pragma GCC unroll 8
      for (int i = 0; i < 16; i += 2) {
        const __m512 a = _mm512_maskz_loadu_ps(km, p[i] + k0), b = _mm512_maskz_loadu_ps(km, p[i + 1] + k0);
        t[i] = _mm512_maskz_unpacklo_ps(all, a, b);  // per 128-bit lane L: rows i, i+1 at columns 4L, 4L+1
        t[i + 1] = _mm512_maskz_unpackhi_ps(all, a, b);  // ... at columns 4L+2, 4L+3
      }
#pragma GCC unroll 4
      for (int g = 0; g < 16; g += 4) {  // u[g + c], lane L: rows g..g+3 at column 4L + c
        const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 2]);
        const __m512d c = _mm512_castps_pd(t[g + 1]), d = _mm512_castps_pd(t[g + 3]);
        u[g] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all8, a, b));
        u[g + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all8, a, b));
        u[g + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all8, c, d));
        u[g + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all8, c, d));
      }
      // The 4 x 4 transpose of 128-bit lanes (row groups x column lanes), per c: col[4L + c] lane G = u[4G + c] lane L.
      __m512 col[16];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 x0 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0x44);
        const __m512 x1 = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0xEE);
        const __m512 x2 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0x44);
        const __m512 x3 = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0xEE);
        col[c] = _mm512_maskz_shuffle_f32x4(all, x0, x2, 0x88);
        col[4 + c] = _mm512_maskz_shuffle_f32x4(all, x0, x2, 0xDD);
        col[8 + c] = _mm512_maskz_shuffle_f32x4(all, x1, x3, 0x88);
        col[12 + c] = _mm512_maskz_shuffle_f32x4(all, x1, x3, 0xDD);
      }
      if (rem == 16) {
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) acc = _mm512_fmadd_ps(col[c], _mm512_set1_ps(q[k0 + c]), acc);
      } else {
        for (int c = 0; c < rem; ++c) acc = _mm512_fmadd_ps(col[c], _mm512_set1_ps(q[k0 + c]), acc);
      }
    }
    const __mmask16 rm = static_cast<__mmask16>((1u << nr) - 1u);
    if (accumulate) acc = _mm512_add_ps(_mm512_maskz_loadu_ps(rm, out + r0), acc);
    _mm512_mask_storeu_ps(out + r0, rm, acc);
  }
}

}  // namespace

const KernelSet& kernels_avx512() {
  static const KernelSet set{Isa::Avx512, kMr, kNr, 256, 192, 4096, ukernel_avx512, row_kernel_avx512, pack_panel<kMr>,
                             pack_panel<kNr>, epilogue_impl,
                             activate_impl, row_sum_impl, update_impl,
                             sum_squares_impl, dot_rows_impl, exp_shift_impl, chain_dots_avx512};
  return set;
}

}  // namespace fastrec
