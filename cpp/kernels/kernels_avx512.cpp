// AVX-512 kernels (compiled with -mavx512f/dq/vl/bw -mfma only). 8 x 32 register tile: 16 accumulators,
// 2 B vectors, A broadcast from memory; 16 FMAs per k keep both FMA ports busy (8 cycles) while the 10
// loads fit the load ports. kc = 256 keeps the 32 KiB B panel (256 x 32 floats) in L1.
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

// Up to V vectors of columns (16 each, the last masked to w), one FMA chain per vector, k in order.
template <int V>
inline void row_group_avx512(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate,
                             int w) {
  __m512 acc[V];
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) {
    const int left = w - 16 * v;
    mask[v] = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
    acc[v] = _mm512_setzero_ps();
  }
  for (index_t k = 0; k < kc; ++k, b += rs_b) {
    const __m512 ak = _mm512_set1_ps(a[k]);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(ak, _mm512_maskz_loadu_ps(mask[v], b + 16 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) {
    if (accumulate) acc[v] = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], c + 16 * v), acc[v]);
    _mm512_mask_storeu_ps(c + 16 * v, mask[v], acc[v]);
  }
}

// V = 4, 8 or 16 full vectors (64, 128, 256 columns): row_group_avx512's chains in named accumulators. The
// array form kept its accumulators (and masks) on the stack, a 64-byte store per FMA: the one-row MLP ran at
// ~35 GFLOP/s, limited by stores.
template <int V, bool kIndexed = false>
inline void row_group_full_avx512(index_t nk, const std::int32_t* idx, const float* a, const float* b,
                                  index_t rs_b, float* c, bool accumulate) {
  static_assert(V == 4 || V == 8 || V == 16, "4, 8 or 16 vectors");
  __m512 r0 = _mm512_setzero_ps(), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0;
  __m512 r8 = r0, r9 = r0, r10 = r0, r11 = r0, r12 = r0, r13 = r0, r14 = r0, r15 = r0;
  // Dense rows of B on 64-byte boundaries: row k + 2 prefetched into L1 (B streams from L2: the one-row MLP's
  // weights do not fit L1). Measured on Zen 5 (benchmarks/SERVING.md): the 10^6-item Recommender's one-row
  // MLP over aligned weights -12%; over NumPy's 16-byte aligned weights +3%, and on the zero-skipping rows
  // +2-7%: not there.
  const bool prefetch = !kIndexed && (reinterpret_cast<std::uintptr_t>(b) | static_cast<std::uintptr_t>(rs_b * 4)) % 64 == 0;
  for (index_t t = 0; t < nk; ++t) {
    const index_t k = kIndexed ? idx[t] : t;  // kIndexed: the rows idx[0..nk) of B only (see below)
    if (prefetch && t + 2 < nk) {
      const char* ahead = reinterpret_cast<const char*>(b + (t + 2) * rs_b);
      for (int v = 0; v < V; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
    }
    const __m512 ak = _mm512_set1_ps(a[k]);
    const float* bk = b + k * rs_b;
    r0 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk), r0);
    r1 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 16), r1);
    r2 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 32), r2);
    r3 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 48), r3);
    if constexpr (V >= 8) {
      r4 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 64), r4);
      r5 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 80), r5);
      r6 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 96), r6);
      r7 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 112), r7);
    }
    if constexpr (V == 16) {
      r8 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 128), r8);
      r9 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 144), r9);
      r10 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 160), r10);
      r11 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 176), r11);
      r12 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 192), r12);
      r13 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 208), r13);
      r14 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 224), r14);
      r15 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(bk + 240), r15);
    }
  }
  const __m512 r[16] = {r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15};
  for (int v = 0; v < V; ++v)
    _mm512_storeu_ps(c + 16 * v, accumulate ? _mm512_add_ps(_mm512_loadu_ps(c + 16 * v), r[v]) : r[v]);
}

// Groups of 256 columns (full: 16 named chains), then of 128 (8 chains; at least 8 independent chains cover
// the FMA latency: 2 chains, one panel at a time, left it exposed, a 161 x 256 layer took ~3x longer). A
// 256-wide layer's B is read once, row after row. Every column is the same chain over k whatever its group.
void row_kernel_avx512(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate, int n) {
  int j0 = 0;
  for (; j0 + 256 <= n; j0 += 256) row_group_full_avx512<16>(kc, nullptr, a, b + j0, rs_b, c + j0, accumulate);
  for (; j0 < n; j0 += 128) {
    const int w = std::min(128, n - j0);
    switch ((w + 15) / 16) {
      case 1: row_group_avx512<1>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      case 2: row_group_avx512<2>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      case 3: row_group_avx512<3>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      case 4:
        if (w == 64) row_group_full_avx512<4>(kc, nullptr, a, b + j0, rs_b, c + j0, accumulate);
        else row_group_avx512<4>(kc, a, b + j0, rs_b, c + j0, accumulate, w);
        break;
      case 5: row_group_avx512<5>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      case 6: row_group_avx512<6>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      case 7: row_group_avx512<7>(kc, a, b + j0, rs_b, c + j0, accumulate, w); break;
      default:
        if (w == 128) row_group_full_avx512<8>(kc, nullptr, a, b + j0, rs_b, c + j0, accumulate);
        else row_group_avx512<8>(kc, a, b + j0, rs_b, c + j0, accumulate, w);
        break;
    }
  }
}

// ---- The one-row product over the nonzero entries of a (after ReLU about half a hidden row is zero) ----
// row_group_full_avx512<V, true>: column chains as the dense kernel's, over the rows k = idx[0..nk) of B
// (increasing) only: a skipped a[k] == 0 would add fma(0, b, acc) = acc exactly (finite b; at most the sign of
// a zero acc differs), so each chain is the dense kernel's, with fewer rows of B read.
}  // namespace

// Whether the row kernel should skip a's zeros: false when fewer than a quarter of a[0..kc) are zero (the
// index pass then costs more than the rows it saves); else idx[0..*nk) = the positions of the nonzeros.
bool row_nonzeros_avx512(index_t kc, const float* a, std::int32_t* idx, index_t* nk) {
  index_t count = 0;
  index_t k = 0;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; k + 16 <= kc; k += 16) {
    const __mmask16 nz = _mm512_cmp_ps_mask(_mm512_loadu_ps(a + k), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    // Compressed in a register, then a full store (idx[count..count + 16) lies within idx[0..k + 16) since
    // count <= k): the memory form of VPCOMPRESSD is microcoded and very slow on Zen 4.
    _mm512_storeu_si512(idx + count,
                        _mm512_maskz_compress_epi32(nz, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k)), lanes)));
    count += __builtin_popcount(static_cast<unsigned>(nz));
  }
  for (; k < kc; ++k)
    if (a[k] != 0.0f) idx[count++] = static_cast<std::int32_t>(k);
  *nk = count;
  return 4 * count <= 3 * kc;
}

// row_kernel_avx512 over the nonzero rows idx[0..nk) (row_nonzeros_avx512): 64-, 128- and 256-column groups;
// other widths take the dense kernel (the caller's choice: row_kernel_nonzero_covers).
void row_kernel_nonzero_avx512(index_t nk, const std::int32_t* idx, const float* a, const float* b, index_t rs_b,
                               float* c, bool accumulate, int n) {
  int j0 = 0;
  for (; j0 + 256 <= n; j0 += 256) row_group_full_avx512<16, true>(nk, idx, a, b + j0, rs_b, c + j0, accumulate);
  for (; j0 + 128 <= n; j0 += 128) row_group_full_avx512<8, true>(nk, idx, a, b + j0, rs_b, c + j0, accumulate);
  for (; j0 + 64 <= n; j0 += 64) row_group_full_avx512<4, true>(nk, idx, a, b + j0, rs_b, c + j0, accumulate);
}

namespace {

// 8 rows in the 8 lanes of a 256-bit vector, row 4h + p in lane h (128-bit half), position p: per 4 columns,
// each row's 4 floats are one 128-bit load, two rows share a vector (one insert), and a 4 x 4 in-lane
// transpose (8 unpacks per 8 rows) gives the columns; then one FMA per k with q[k] broadcast, k in order: the
// micro-kernel's fmadd(a(i, k), b(k, j), acc) chain per row. G groups of 8 rows run side by side so that G
// chains hide the FMA latency. On Zen 4 (AVX-512 double-pumped) this 256-bit form measured ~4.2 ns per row
// at dim 64 on one core against ~5.4 for 16 rows in 512-bit lanes transposed by 64 shuffles per 256 floats
// (G = 4; 2 groups 4.6, 8 groups 4.4); 512-bit lanes built from 128-bit broadcast loads, masked loads or
// blends measured no faster. The shuffle ports are the limit (16 unpacks + 8 inserts per row).
// kFull: all 8G rows exist; otherwise rows past `nrows` repeat row nrows - 1 (read, never stored). Columns
// past the last multiple of 4 are added one gathered column at a time.
template <int G, bool kFull>
inline void chain_block(index_t kc, const float* x, index_t ld, index_t nrows, const float* q, float* out,
                        bool accumulate) {
  auto off = [&](int r) { return (kFull || r < nrows ? r : nrows - 1) * ld; };
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  index_t k0 = 0;
  for (; k0 + 4 <= kc; k0 += 4) {
    const float* b = x + k0;
    const __m256 q0 = _mm256_broadcast_ss(q + k0), q1 = _mm256_broadcast_ss(q + k0 + 1);
    const __m256 q2 = _mm256_broadcast_ss(q + k0 + 2), q3 = _mm256_broadcast_ss(q + k0 + 3);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __m256 w[4];
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p)  // lane 0: row 8g + p, lane 1: row 8g + 4 + p
        w[p] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(b + off(8 * g + p))),
                                    _mm_loadu_ps(b + off(8 * g + 4 + p)), 1);
      const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(w[0], w[1]));  // per lane: r0 c0, r1 c0, r0 c1, r1 c1
      const __m256d t1 = _mm256_castps_pd(_mm256_unpackhi_ps(w[0], w[1]));  // ... c2, c3
      const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(w[2], w[3]));
      const __m256d t3 = _mm256_castps_pd(_mm256_unpackhi_ps(w[2], w[3]));
      acc[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2)), q0, acc[g]);
      acc[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2)), q1, acc[g]);
      acc[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3)), q2, acc[g]);
      acc[g] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3)), q3, acc[g]);
    }
  }
  for (; k0 < kc; ++k0) {
    const __m256 qk = _mm256_broadcast_ss(q + k0);
    for (int g = 0; g < G; ++g) {
      const float* b = x + k0;
      const __m256 col = _mm256_setr_ps(b[off(8 * g)], b[off(8 * g + 1)], b[off(8 * g + 2)], b[off(8 * g + 3)],
                                        b[off(8 * g + 4)], b[off(8 * g + 5)], b[off(8 * g + 6)], b[off(8 * g + 7)]);
      acc[g] = _mm256_fmadd_ps(col, qk, acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const index_t left = kFull ? 8 : nrows - 8 * g;
    if (left <= 0) break;
    const __mmask8 m = left >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
    if (accumulate) acc[g] = _mm256_add_ps(_mm256_maskz_loadu_ps(m, out + 8 * g), acc[g]);
    _mm256_mask_storeu_ps(out + 8 * g, m, acc[g]);
  }
}

void chain_dots_avx512(index_t kc, const float* x, index_t ld, index_t rows, const float* q, float* out,
                       bool accumulate) {
  index_t r0 = 0;
  for (; r0 + 32 <= rows; r0 += 32) chain_block<4, true>(kc, x + r0 * ld, ld, 32, q, out + r0, accumulate);
  for (; r0 + 8 <= rows; r0 += 8) chain_block<1, true>(kc, x + r0 * ld, ld, 8, q, out + r0, accumulate);
  if (r0 < rows) chain_block<1, false>(kc, x + r0 * ld, ld, rows - r0, q, out + r0, accumulate);
}

}  // namespace

const KernelSet& kernels_avx512() {
  static const KernelSet set{Isa::Avx512, kMr, kNr, 256, 192, 4096, ukernel_avx512, row_kernel_avx512, pack_panel<kMr>,
                             pack_panel<kNr>, epilogue_impl,
                             activate_impl, row_sum_impl, update_impl,
                             sum_squares_impl, dot_rows_impl, exp_shift_impl, chain_dots_avx512, act_dots_impl,
                             dropout_row_impl, att_transpose_impl, att_rows_cols_impl, att_weights_rows_impl,
                             att_weights_t_rows_impl, layer_norm_impl,
                             layer_norm_backward_impl, fill_normal_impl,
                             standardize_rows_impl<float>, standardize_rows_impl<double>};
  return set;
}

}  // namespace fastrec
