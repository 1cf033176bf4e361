// What the two AVX512-BF16 kernel files share (kernels_avx512_bf16.cpp, kernels_avx512_bf16_seq.cpp): float to
// bf16 rounding of 16 lanes with bf16_round_bits' bits, and 32 floats into the 16 pair words VDPBF16PS reads.
// Include ONLY from those two files, after <immintrin.h>: CMakeLists.txt compiles both, and nothing else, with
// -mavx512bf16. Internal linkage, as elementwise_impl.h: no copy may be merged into code built for another ISA.
#pragma once

namespace fastrec {
namespace {

// The maskz forms with every lane set: the plain _mm512_srli_epi32 / _mm512_cvtepi32_epi16 trip a false
// -Wmaybe-uninitialized in GCC 12 (their _mm512_undefined_* pass-through operand), as in kernels_avx512.cpp.
constexpr __mmask16 kAll = 0xFFFF;
inline __m512i srl16(__m512i x) { return _mm512_maskz_srli_epi32(kAll, x, 16); }

// The first `count` lanes (none for count <= 0, all for count >= 16).
inline __mmask16 lanes(index_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1u);
}

// 16 floats rounded as bf16_round_bits rounds one: the bf16 in each lane's high half, the low half zero.
inline __m512i round16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(srl16(u), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// Lanes holding a denormal (exponent bits zero, mantissa not), tested on the integers: VFPCLASSPS follows
// MXCSR.DAZ, which the core sets (parallel.h FlushDenormals).
inline __mmask16 denormals(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  return _mm512_mask_test_epi32_mask(_mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000)), u,
                                     _mm512_set1_epi32(0x007FFFFF));
}

// The word permutation that takes VCVTNE2PS2BF16's result (elements 0-15: bf16(lo), 16-31: bf16(hi)) to pair
// words (element 2c = lo[c], 2c + 1 = hi[c]).
inline __m512i pair_interleave() {
  alignas(64) static const std::uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(kInterleave);
}

// 16 pair words: low half bf16(lo[c]), high half bf16(hi[c]) (interleave: pair_interleave()). VCVTNE2PS2BF16
// rounds as bf16_round_bits (to nearest even, NaN quieted the same way, overflow to inf) except that it reads a
// denormal input as zero; a vector with one takes round16 instead, so the words are bf16_round_bits' for every
// input.
inline __m512i pair_words(__m512 lo, __m512 hi, __m512i interleave) {
  if (__builtin_expect((denormals(lo) | denormals(hi)) != 0, 0))
    return _mm512_or_si512(srl16(round16(lo)), round16(hi));
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

}  // namespace
}  // namespace fastrec
