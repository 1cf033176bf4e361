// AVX512-BF16 kernels of the bf16 GEMM (kernels.h, "bfloat16 products"): compiled with -mavx512f/dq/vl/bw
// -mavx512bf16 -mfma only, and called only when isa.h's bf16_native_available() says the CPU has avx512_bf16.
// Register tile 12 x 32 as the float32 AVX-512 kernel: 24 float32 accumulators, 2 B vectors of 16 columns x
// one k pair, each A pair broadcast from memory; a k pair step is 24 VDPBF16PS (32 multiply-adds each, twice
// an FMA's 16). kc = 1024 k (512 pairs): a K up to 1024 is one block, so C is written once (Mult-VAE's logits,
// K = 600: 78-80 ms in two blocks of 300, 69-72 ms in one, 1 thread); the 64 KiB B panel then streams from L2,
// which its 128 bytes per 24 VDPBF16PS allow (kc = 512 and 768 measured no faster on the other products).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/bf16_avx512_impl.h"

namespace fastrec {
namespace {

constexpr int kMr = 12, kNr = 32;
constexpr __mmask8 kAll8 = 0xFF;  // kAll's 8-lane twin (bf16_avx512_impl.h)

// 32 floats (lo: the first 16, hi: the next 16) rounded as bf16_round_bits rounds one, the 32 bf16 in order:
// pair_words' rounding (a vector holding a denormal takes round16) without its interleave.
inline __m512i bf16x32(__m512 lo, __m512 hi) {
  if (__builtin_expect((denormals(lo) | denormals(hi)) != 0, 0)) {
    alignas(64) static const std::uint16_t kHigh[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                       23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                       45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    return _mm512_permutex2var_epi16(round16(lo), _mm512_load_si512(kHigh), round16(hi));
  }
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Element (r, k) = src[k * ld + r]: rows k and k + 1 are contiguous runs, rounded together into the pair
// words (pair_words).
template <int R>
void pack_k_major(const float* src, index_t ld, int count, index_t kc, std::uint32_t* out) {
  constexpr int V = (R + 15) / 16;
  __mmask16 load[V], store[V];
  for (int v = 0; v < V; ++v) {
    load[v] = lanes(std::min(count, R) - 16 * v);
    store[v] = lanes(R - 16 * v);
  }
  const __m512i interleave = pair_interleave();
  const index_t pairs = (kc + 1) / 2;
  for (index_t kp = 0; kp < pairs; ++kp) {
    const float* s0 = src + 2 * kp * ld;
    const bool odd = 2 * kp + 1 < kc;
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const __m512 lo = _mm512_maskz_loadu_ps(load[v], s0 + 16 * v);
      const __m512 hi = odd ? _mm512_maskz_loadu_ps(load[v], s0 + ld + 16 * v) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi32(out + kp * R + 16 * v, store[v], pair_words(lo, hi, interleave));
    }
  }
}

// 16 registers of 16 words transposed in place: w[i] lane j <-> w[j] lane i (unpacks within 128-bit lanes,
// then 128-bit blocks shuffled across registers).
inline void transpose16(__m512i (&w)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_epi32(kAll, w[i], w[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_epi32(kAll, w[i], w[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    w[i] = _mm512_maskz_unpacklo_epi64(kAll8, t[i], t[i + 2]);
    w[i + 1] = _mm512_maskz_unpackhi_epi64(kAll8, t[i], t[i + 2]);
    w[i + 2] = _mm512_maskz_unpacklo_epi64(kAll8, t[i + 1], t[i + 3]);
    w[i + 3] = _mm512_maskz_unpackhi_epi64(kAll8, t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_maskz_shuffle_i32x4(kAll, w[h + i], w[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_maskz_shuffle_i32x4(kAll, w[h + i], w[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_maskz_shuffle_i32x4(kAll, t[i], t[i + 8], 0x88);
    w[i + 8] = _mm512_maskz_shuffle_i32x4(kAll, t[i], t[i + 8], 0xdd);
  }
}

// Element (r, k) = src[r * ld + k]: each row's consecutive floats are already its pairs. 32 k at a time, 16
// rows at once: each row's 32 floats rounded and narrowed to 16 pair words (one register), the 16 x 16 words
// transposed, then each pair's words of the rows stored together (a word-by-word scatter down the panel's
// columns cost about twice as much); the last k % 32 row by row.
template <int R>
void pack_rows(const float* src, index_t ld, int count, index_t kc, std::uint32_t* out) {
  index_t k0 = 0;
  for (; k0 + 32 <= kc; k0 += 32) {
    for (int g = 0; g < R; g += 16) {
      const int rows = std::min(16, R - g);
      __m512i w[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const int r = g + i;
        if (i < rows && r < count) {
          const float* s = src + r * ld + k0;
          // the bf16s of k0..k0+31 in order: word p = (k0 + 2p, k0 + 2p + 1)
          w[i] = bf16x32(_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16));
        } else {
          w[i] = _mm512_setzero_si512();
        }
      }
      transpose16(w);
      std::uint32_t* o = out + (k0 / 2) * R + g;
      const __mmask16 m = lanes(rows);
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) _mm512_mask_storeu_epi32(o + p * R, m, w[p]);
    }
  }
  for (int r = 0; r < R; ++r) {
    std::uint32_t* o = out + r;
    for (index_t k = k0; k < kc; k += 2) {
      const float* s = src + (r < count ? r : 0) * ld;  // rows past count: zeros
      const std::uint32_t lo = r < count ? bf16_round_bits(s[k]) >> 16 : 0u;
      const std::uint32_t hi = r < count && k + 1 < kc ? bf16_round_bits(s[k + 1]) : 0u;
      o[(k / 2) * R] = lo | hi;
    }
  }
}

template <int R>
void pack_bf16(bool k_major, const float* src, index_t ld, int count, index_t kc, std::uint32_t* out) {
  if (k_major)
    pack_k_major<R>(src, ld, count, kc, out);
  else
    pack_rows<R>(src, ld, count, kc, out);
}

// C's tile rows: unmasked loads and stores on full tiles (kFull: m = MR, n = NR), masked ones on edge tiles.
template <bool kFull>
inline __m512 load_c(const float* p, __mmask16 mask) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}
template <bool kFull>
inline void store_c(float* p, __mmask16 mask, __m512 v) {
  if (kFull)
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, mask, v);
}

// The tile's accumulators to C: the sum with C (accumulate), then Bf16Extra's operations (kernels.h), in
// registers. kHalf: n <= 16, the second half neither computed nor stored.
template <bool kHalf, bool kFull>
inline void finish(__m512 (&acc0)[kMr], __m512 (&acc1)[kMr], float* c, index_t ldc, bool accumulate, int m, int n,
                   const Bf16Extra* extra) {
  const __mmask16 mask0 = lanes(n), mask1 = lanes(n - 16);
  const float* bias = extra ? extra->bias : nullptr;
  const bool relu = extra && extra->relu;
  const __m512 bias0 = bias ? load_c<kFull>(bias, mask0) : _mm512_setzero_ps();
  const __m512 bias1 = bias && !kHalf ? load_c<kFull>(bias + 16, mask1) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    if (!kFull && i >= m) break;
    float* ci = c + i * ldc;
    __m512 r0 = acc0[i], r1 = acc1[i];
    if (accumulate) {
      r0 = _mm512_add_ps(load_c<kFull>(ci, mask0), r0);
      if (!kHalf) r1 = _mm512_add_ps(load_c<kFull>(ci + 16, mask1), r1);
    }
    if (extra) {
      if (extra->addend) {  // epilogue_impl's v += 1 * addend: the product by 1 is exact
        const float* ad = extra->addend + i * extra->ld_addend;
        r0 = _mm512_add_ps(r0, load_c<kFull>(ad, mask0));
        if (!kHalf) r1 = _mm512_add_ps(r1, load_c<kFull>(ad + 16, mask1));
      }
      if (bias) {
        r0 = _mm512_add_ps(r0, bias0);
        if (!kHalf) r1 = _mm512_add_ps(r1, bias1);
      }
      if (relu) {  // max(v, +0): +0 for NaN and -0, as apply_act's v > 0 ? v : 0
        r0 = _mm512_maskz_max_ps(kAll, r0, zero);
        if (!kHalf) r1 = _mm512_maskz_max_ps(kAll, r1, zero);
      }
      if (extra->mul) {  // a multiplication by 0 or 1, as in the epilogue (inf * 0 stays NaN)
        const float* u = extra->mul + i * extra->ld_mul;
        r0 = _mm512_mul_ps(r0, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load_c<kFull>(u, mask0), zero, _CMP_GT_OQ), one));
        if (!kHalf)
          r1 = _mm512_mul_ps(r1, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load_c<kFull>(u + 16, mask1), zero, _CMP_GT_OQ), one));
      }
      if (extra->residual) {  // x += v * drop, as the model's loop x[i] += t[i] * mask[i]; C is not written
        float* x = extra->residual + i * extra->ld_residual;
        const float* dm = extra->drop + i * extra->ld_residual;
        // the _round_ product: GCC does not contract it with the sum into an FMA (one rounding, other bits)
        constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        r0 = _mm512_add_ps(load_c<kFull>(x, mask0), _mm512_maskz_mul_round_ps(kAll, r0, load_c<kFull>(dm, mask0), kNear));
        store_c<kFull>(x, mask0, r0);
        if (!kHalf) {
          r1 = _mm512_add_ps(load_c<kFull>(x + 16, mask1),
                             _mm512_maskz_mul_round_ps(kAll, r1, load_c<kFull>(dm + 16, mask1), kNear));
          store_c<kFull>(x + 16, mask1, r1);
        }
        continue;
      }
    }
    store_c<kFull>(ci, mask0, r0);
    if (!kHalf) store_c<kFull>(ci + 16, mask1, r1);
  }
}

// One tile, start to finish, in one function: the 24 accumulators stay in registers (with the loop in a helper
// taking them by reference and a branch between two loops, GCC kept them in stack arrays, zeroed by two
// `rep stos` per call: ~1.5% of a bf16 training epoch). kRows: A's rows read in place, a(i, kp) = a[i * rs_a +
// kp] (rows past m re-read row 0, never stored); else a packed MR panel, a(i, kp) = a[kp * MR + i].
template <bool kHalf, bool kRows>
void tile(index_t kp_count, const std::uint32_t* a, index_t rs_a, const std::uint32_t* b, float* c, index_t ldc,
          bool accumulate, int m, int n, const Bf16Extra* extra) {
  __m512 acc0[kMr], acc1[kMr];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  const std::uint32_t* row[kMr];
  if (kRows)
    for (int i = 0; i < kMr; ++i) row[i] = a + (i < m ? i : 0) * rs_a;
  for (index_t kp = 0; kp < kp_count; ++kp, b += kNr) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = kHalf ? b0 : (__m512bh)_mm512_loadu_si512(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const std::uint32_t word = kRows ? row[i][kp] : a[kp * kMr + i];
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
      if (!kHalf) acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
    }
  }
  if (!kHalf && m == kMr && n == kNr)
    finish<false, true>(acc0, acc1, c, ldc, accumulate, m, n, extra);
  else
    finish<kHalf, false>(acc0, acc1, c, ldc, accumulate, m, n, extra);
}

void ukernel_avx512_bf16(index_t kp_count, const std::uint32_t* a, const std::uint32_t* b, float* c, index_t ldc,
                         bool accumulate, int m, int n, const Bf16Extra* extra) {
  if (n <= 16)
    tile<true, false>(kp_count, a, 0, b, c, ldc, accumulate, m, n, extra);
  else
    tile<false, false>(kp_count, a, 0, b, c, ldc, accumulate, m, n, extra);
}

// ---- row-major A in place (kernels.h Bf16RowsKernels) ----

void convert_rows(const float* src, index_t ld, index_t rows, index_t kc, std::uint32_t* out, index_t ld_out) {
  for (index_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    auto* o = reinterpret_cast<std::uint16_t*>(out + r * ld_out);  // pair word kp = halves 2kp (low), 2kp + 1
    index_t k = 0;
    for (; k + 32 <= kc; k += 32) _mm512_storeu_si512(o + k, bf16x32(_mm512_loadu_ps(s + k), _mm512_loadu_ps(s + k + 16)));
    for (; k + 16 <= kc; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                          _mm512_maskz_cvtepi32_epi16(kAll, srl16(round16(_mm512_loadu_ps(s + k)))));
    if (k < kc) {
      const __mmask16 tail = lanes(kc - k);
      const __m256i w = _mm512_maskz_cvtepi32_epi16(kAll, srl16(round16(_mm512_maskz_loadu_ps(tail, s + k))));
      _mm256_mask_storeu_epi16(o + k, static_cast<__mmask16>(tail), w);
    }
    if (kc % 2) o[kc] = 0;
  }
}

void ukernel_rows_avx512_bf16(index_t kp_count, const std::uint32_t* a, index_t rs_a, const std::uint32_t* b,
                              float* c, index_t ldc, bool accumulate, int m, int n, const Bf16Extra* extra) {
  if (n <= 16)
    tile<true, true>(kp_count, a, rs_a, b, c, ldc, accumulate, m, n, extra);
  else
    tile<false, true>(kp_count, a, rs_a, b, c, ldc, accumulate, m, n, extra);
}

}  // namespace

const Bf16RowsKernels& bf16_rows_kernels_avx512() {
  static const Bf16RowsKernels set{convert_rows, ukernel_rows_avx512_bf16};
  return set;
}

const Bf16KernelSet& bf16_kernels_avx512() {
  static const Bf16KernelSet set{kMr, kNr, 1024, 192, 4096, ukernel_avx512_bf16, pack_bf16<kMr>, pack_bf16<kNr>};
  return set;
}

}  // namespace fastrec
