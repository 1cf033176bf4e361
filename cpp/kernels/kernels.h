// The per-ISA kernel table. Each ISA's kernels live in their own translation unit compiled with only that
// ISA's flags (kernels_scalar.cpp has none), so no SIMD type appears here and the rest of the library is
// baseline x86-64. The table is immutable; callers pick one per call (see isa.h).
#pragma once
#include <cstdint>
#include <cstring>

#include "common.h"
#include "isa.h"

namespace fastrec {

// Applied once to each finished C tile while it is in L1, in this order:
//   v = scale * C + addend_scale * addend + bias;  v = act(v);  v *= act'(mul) (mul: activation outputs).
// scale == 0 means C is not read: v = addend_scale * addend + bias.
// Pointers may be null (term skipped). row0/col0 passed to the epilogue locate the tile in the full matrices.
struct Epilogue {
  float scale = 1.0f;
  const float* addend = nullptr;  // (M, N) matrix, leading dimension ld_addend
  index_t ld_addend = 0;
  float addend_scale = 0.0f;
  const float* bias = nullptr;    // (N,) vector
  Activation act = Activation::Identity;
  const float* mul = nullptr;     // (M, N) activation outputs, leading dimension ld_mul
  index_t ld_mul = 0;
  Activation mul_act = Activation::Identity;
  // Last, when set: v = e^v (for v <= 0 up to rounding: the two-tower softmax's logits minus a fixed bound),
  // and the sum of each row's n values of the call, added in a fixed order, written to
  // exp_sums[(row0 + i) * ld_sums + col0 / sums_width]. Each call must cover one sums_width-aligned group of
  // columns (sgemm's tiles of NR columns, with sums_width = NR): the sums then do not depend on the threads.
  float* exp_sums = nullptr;
  index_t ld_sums = 0;
  index_t sums_width = 1;
};

// Micro-kernel contract: a is an MR x kc block read with strides, a(i, k) = a[i * rs_a + k * cs_a] (a packed
// panel has rs_a = 1, cs_a = MR; a row-major block read in place has rs_a = lda, cs_a = 1), all MR rows
// readable; b is a kc x NR block with row stride rs_b, b(k, j) = b[k * rs_b + j], all NR columns readable
// (a packed, zero-padded panel has rs_b = NR; a row-major B read in place has rs_b = ldb). Computes acc = sum_k a(:,k) b(k,:)
// as one FMA chain per element in k order, then writes C[i][j] = acc (accumulate=false) or C[i][j] += acc,
// for i < m <= MR, j < n <= NR, then does what `extra` asks (null: nothing more).
// What a micro-kernel call may do beyond the product.
//  - scale, bias, act, mul: for the call that completes C's sum over K, before the tile leaves the registers,
//    C[i][j] = act(scale * C[i][j] + bias[j]) * act'(mul[i][j]) (mul: activation outputs, act' in terms of
//    them), the same operations in the same order as the Epilogue without an addend, so bitwise what it
//    gives, without a second pass over C.
//  - prefetch: n_prefetch regions of prefetch_lines consecutive 64-byte lines each, to bring into L2 while
//    the FMAs run, one line every few k steps (a burst of prefetches would stall on the L1 fill buffers;
//    spread out, streaming them costs nothing).
//  - exp_sums: then the Epilogue's exponential and row sums (kernels.h, Epilogue::exp_sums).
struct TileExtra {
  float scale = 1.0f;
  const float* bias = nullptr;  // (N,) vector indexed by the tile's columns: bias[j] for j < n
  Activation act = Activation::Identity;
  const float* mul = nullptr;   // the tile's rows of the activation outputs, mul[i * ld_mul + j]
  index_t ld_mul = 0;
  Activation mul_act = Activation::Identity;
  const void* const* prefetch = nullptr;
  int n_prefetch = 0;
  int prefetch_lines = 1;
  float* exp_sums = nullptr;  // the Epilogue's exp_sums at the tile's first row and column group
  index_t ld_sums = 0;
};
using UkernelFn = void (*)(index_t kc, const float* a, index_t rs_a, index_t cs_a, const float* b, index_t rs_b,
                           float* c, index_t ldc, bool accumulate, int m, int n, const TileExtra* extra);
// The micro-kernel's row 0 alone, for one-row products (a single prediction): c[0:n] = or += sum_k a[k] b(k, :)
// with b(k, j) = b[k * rs_b + j] read in place (any n), the same FMA chain per element as the micro-kernel, so
// a row's result does not depend on whether it came alone or in a batch.
using RowKernelFn = void (*)(index_t kc, const float* a, const float* b, index_t rs_b, float* c, bool accumulate,
                             int n);
using EpilogueFn = void (*)(float* c, index_t ldc, int m, int n, index_t row0, index_t col0, const Epilogue& e);
// x[i] = act(x[i]) for i < n (not softmax).
using ActivateFn = void (*)(float* x, index_t n, Activation act);
// out[0:n] = sum_e weights[e] * M[ids[e]][0:n], entries added in order e = 0, 1, ... (one FMA chain per
// element: the sparse "CSR times matrix" row and the "scatter rows" gradient row are both this).
using RowSumFn = void (*)(const float* weights, const std::int32_t* ids, index_t count, const float* M, index_t ld,
                          index_t n, float* out);

// One optimizer step on a span of a parameter with gradient g (docs/DESIGN.md):
//   Sgd        SGD with momentum / Nesterov, s1 = velocity (the MLP's "sgd")
//   Adagrad    element-wise, s1 = sum of squared gradients
//   Adam       s1, s2 = moments; lr already bias-corrected for the step
//   PlainSgd   p -= lr g, no state (embedding rows under "sgd")
//   RowAdagrad one accumulator for the whole span (an embedding row): s1[0] += mean(g^2)
enum class UpdateKind : int { Sgd, Adagrad, Adam, PlainSgd, RowAdagrad };
struct UpdateRule {
  UpdateKind kind = UpdateKind::Sgd;
  bool nesterov = false;
  float lr = 0.0f, momentum = 0.0f, beta_1 = 0.9f, beta_2 = 0.999f, epsilon = 1e-8f;
};
using UpdateFn = void (*)(const UpdateRule& rule, float* p, const float* g, float* s1, float* s2, index_t len);

// Packs one panel for the micro-kernel: out[k * R + r] for r < R (R = MR for A, NR for B), k < kc, zero for
// r >= count. k_major: element (r, k) = src[k * ld + r] (a contiguous run per k); else src[r * ld + k].
using PackFn = void (*)(bool k_major, const float* src, index_t ld, int count, index_t kc, float* out);
// sum of x[i]^2 for i < n, accumulated in a fixed order.
using SumSquaresFn = double (*)(const float* x, index_t n);
// out[r] = bias + sum_j x[r * ld + j] * w[j] for r < rows, j < n, in a fixed summation order (a one-output
// layer, in top-k and in sgemm's N = 1 products, where the micro-kernel would compute 1 column of NR).
using DotRowsFn = void (*)(const float* x, index_t ld, index_t rows, const float* w, index_t n, float bias, float* out);

// x[i] = e^(x[i] - max) in place for i < n (0 where x[i] is -inf: a column left out), with *max the maximum
// and *sum the sum of the results, added in a fixed order (the two-tower softmax over a batch's candidates).
using ExpShiftFn = void (*)(float* x, index_t n, float* max, float* sum);

// out[r] = sum_k x[r * ld + k] * q[k] for r < rows, k < kc (accumulate: out[r] += that sum), each sum ONE chain
// in k order from 0, the micro-kernel's chain for a C element whose A row is x's row and B column q: a query
// scored alone against item rows (top-k at memory speed) gets the bits a tile of queries would give it.
using ChainDotsFn = void (*)(index_t kc, const float* x, index_t ld, index_t rows, const float* q, float* out,
                             bool accumulate);

// The approximate top-k's proxy (fields.h field_topk, approx_fraction; act_dots_impl.h):
// out[r] = bias + sum_j a[j] * act(x_r[j] + u[j]) + sum_i g[i] * y_r[i] for r < n, j < h (h a multiple of 32),
// i < d, x_r the bf16 row x + items[r] * ld (bf16 bits, widened exactly to float), y_r the float row
// y + items[r] * ld_y (y == nullptr: no second sum). u and a are given in "pair-split" order (act_dots_split):
// per 32 elements, the 16 even ones then the 16 odd ones, the order in which two integer ops widen 32 bf16.
// Each sum: 16 float lanes over j then i, then the lanes added in a fixed tree (lane_sum): a row's value does
// not depend on the rows it is computed with.
using ActDotsFn = void (*)(const std::uint16_t* x, index_t ld, const std::int32_t* items, index_t n, index_t h,
                           const float* u, const float* a, const float* y, index_t ld_y, index_t d, const float* g,
                           float bias, Activation act, float* out);

// One row of dropout multipliers (reference.dropout_scale): out[c] = scale where the top 24 bits of
// mix(key + (e0 + c) * 0x9e3779b97f4a7c15) (splitmix64's finaliser) are >= threshold, else 0, for c < n.
// Integer arithmetic: every ISA gives the same bits.
using DropoutRowFn = void (*)(std::uint64_t key, std::uint64_t e0, index_t n, std::uint64_t threshold, float scale,
                              float* out);

// Initial parameters (prepare.h, fill_normal): out[i] = loc + scale * z for i < n, z from splitmix64's output for
// (seed, first + i). Integer arithmetic and two float roundings: every ISA gives the same bits.
using FillNormalFn = void (*)(std::uint64_t seed, std::uint64_t first, index_t n, float loc, float scale, float* out);

// Numeric columns standardised (prepare.h, standardize): out[r * c + j] = float32((values[r * c + j] - mean[j]) /
// std[j]) in float64 for r < rows, j < c (one division each: the same bits on every ISA); returns whether a
// result is beyond float32's range.
using StandardizeF32Fn = bool (*)(const float* values, index_t rows, index_t c, const double* mean,
                                  const double* std, float* out);
using StandardizeF64Fn = bool (*)(const double* values, index_t rows, index_t c, const double* mean,
                                  const double* std, float* out);

// The small products of causal attention over one sequence's rows (n <= a few hundred, width w a multiple of
// 16, every row read or written over w floats), each output element ONE chain in a fixed order that does not
// depend on which rows the call covers (so a row computed alone has the bits it has in the whole pass):
//  - rows_cols:    out[t][j] = scale * sum_k x[t][k] yt[k][j] (k < w in order) for rows t0 <= t < t1 and at
//                  least the columns j <= t, in whole 16-column groups (yt: w x (columns) with row stride ldy,
//                  readable up to the 16-group past t1 - 1). Scores Q Kᵀ and dA = dO Vᵀ (Kᵀ / Vᵀ packed).
//  - weights_rows: out[t][:] = sum_j p[t][j] y[j][:] for j = 0 .. t in order, t0 <= t < t1 (A V, dS K). The
//                  chain may run on past t up to the call's last row: p[t][j] must be 0 for j > t.
//  - weights_t_rows: out[j][:] = sum_t p[t][j] y[t][:] for t = j .. n - 1 in order, j0 <= j < j1 (Aᵀ dO, dSᵀ Q);
//                  the chain may start at j0: p[t][j] must be 0 for t < j.
//  - transpose:    yt (w x np) = the transpose of n rows of dh floats (row stride ld), zero past row dh and
//                  column n (w, np: multiples of 16): the packed Kᵀ / Vᵀ of rows_cols.
using TransposeFn = void (*)(const float* y, index_t ld, index_t n, index_t dh, index_t w, index_t np, float* yt);
using RowsColsFn = void (*)(const float* x, index_t ldx, index_t t0, index_t t1, const float* yt, index_t ldy, index_t w,
                            float scale, float* out, index_t ldo);
using WeightsRowsFn = void (*)(const float* p, index_t ldp, index_t t0, index_t t1, const float* y, index_t ldy, index_t w,
                               float* out, index_t ldo);
using WeightsTRowsFn = void (*)(const float* p, index_t ldp, index_t j0, index_t j1, index_t n, const float* y,
                                index_t ldy, index_t w, float* out, index_t ldo);

// Layer norm of `rows` contiguous rows of n floats: xhat = (x - mean) rstd, rstd = 1 / sqrt(var + eps) (kept
// per row), y = xhat gamma + beta. Row sums in 16 float lanes added in a fixed order.
using LayerNormFn = void (*)(const float* x, index_t rows, index_t n, const float* gamma, const float* beta, float eps,
                             float* xhat, float* rstd, float* y);
// Its backward for those rows: with g = dy gamma, dx += rstd (g - mean(g) - xhat mean(g xhat)); p = dy xhat (the
// rows whose column sums are dgamma).
using LayerNormBackwardFn = void (*)(const float* dy, const float* gamma, const float* xhat, const float* rstd,
                                     index_t rows, index_t n, float* p, float* dx);

struct KernelSet {
  Isa isa;
  int mr, nr;        // register tile
  index_t kc, mc, nc;  // cache blocks: kc x nr B panel in L1, mc x kc A block in L2
  UkernelFn ukernel;
  RowKernelFn row_kernel;
  PackFn pack_a, pack_b;  // R = mr and R = nr
  EpilogueFn epilogue;
  ActivateFn activate;
  RowSumFn row_sum;
  UpdateFn update;
  SumSquaresFn sum_squares;
  DotRowsFn dot_rows;
  ExpShiftFn exp_shift;
  ChainDotsFn chain_dots;
  ActDotsFn act_dots;
  DropoutRowFn dropout_row;
  TransposeFn att_transpose;
  RowsColsFn att_rows_cols;
  WeightsRowsFn att_weights_rows;
  WeightsTRowsFn att_weights_t_rows;
  LayerNormFn layer_norm;
  LayerNormBackwardFn layer_norm_backward;
  FillNormalFn fill_normal;
  StandardizeF32Fn standardize_f32;
  StandardizeF64Fn standardize_f64;
};

// ---- bfloat16 products (gemm.h, bf16_gemm) ----
// Packed bf16 panels hold PAIRS of k: element (r, kp) of a panel is one 32-bit word whose low half is the bf16
// of (r, 2 kp) and whose high half that of (r, 2 kp + 1) (0 past kc), the operand layout of VDPBF16PS, which
// adds both products of a pair to a float32 lane. Panels are laid out like the float32 ones: word (r, kp) at
// out[kp * R + r], R = MR for A and NR for B, zero for r >= count. Floats are rounded to bf16 to nearest, ties
// to even (NaN stays NaN, overflow gives inf), while packing.
// x rounded to bf16 (to nearest, ties to even; NaN stays a quiet NaN): the bf16 in the high 16 bits of the
// result, the low 16 bits zero (so the result's bits are also the float value of the bf16).
// static: each object file keeps its own copy, compiled with its own flags (a shared inline copy could be
// the AVX-512 file's, run by the emulated path on a CPU without AVX-512 when not inlined).
static inline std::uint32_t bf16_round_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u | 0x00400000u) & 0xFFFF0000u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}
using Bf16PackFn = void (*)(bool k_major, const float* src, index_t ld, int count, index_t kc, std::uint32_t* out);
// What a bf16 micro-kernel call does with the tile before it leaves the registers, when the call completes C's
// sum over K: the Epilogue's operations that it names, in the Epilogue's order (so epilogue_impl's bits,
// without a second pass over the tile): v += addend[i][j] (addend_scale 1), v += bias[j], v = max(v, 0) (ReLU),
// v *= (mul[i][j] > 0 ? 1 : 0).
struct Bf16Extra {
  const float* addend = nullptr;  // the tile's rows of the addend, addend[i * ld_addend + j]
  index_t ld_addend = 0;
  const float* bias = nullptr;    // bias[j] for j < n
  bool relu = false;
  const float* mul = nullptr;     // the tile's rows of the ReLU outputs, mul[i * ld_mul + j]
  index_t ld_mul = 0;
  // Last, when set (gemm.h bf16_gemm_rows_residual): residual[i][j] += v * drop[i][j] instead of storing v to C.
  float* residual = nullptr;      // the tile's rows, residual[i * ld_residual + j]; drop likewise
  const float* drop = nullptr;
  index_t ld_residual = 0;
};
// acc(i, j) = sum over kp of the pair products of a(i, kp) and b(kp, j), kp = 0 .. kp_count - 1 in order (a
// packed MR panel, a packed NR panel); then C[i][j] = acc or C[i][j] += acc for i < m, j < n, then `extra`
// (null: nothing more).
using Bf16UkernelFn = void (*)(index_t kp_count, const std::uint32_t* a, const std::uint32_t* b, float* c,
                               index_t ldc, bool accumulate, int m, int n, const Bf16Extra* extra);
struct Bf16KernelSet {
  int mr, nr;
  index_t kc, mc, nc;  // kc in k (even: a pair never straddles two K blocks)
  Bf16UkernelFn ukernel;
  Bf16PackFn pack_a, pack_b;  // R = mr and R = nr
};
#ifdef FASTREC_HAVE_BF16_KERNELS
const Bf16KernelSet& bf16_kernels_avx512();  // kernels_avx512_bf16.cpp: needs avx512_bf16 (isa.h)
#endif
// bf16 products with row-major A read in place after a contiguous conversion (gemm.h bf16_gemm_rows): no MR
// panels. convert(src, ld, rows, kc, out, ld_out): row r's kc floats rounded to bf16, stored as (kc + 1) / 2
// pair words at out + r * ld_out (an odd kc's last pair has a zero high half). ukernel: the Bf16UkernelFn sums
// (same order, same bits) with a(i, kp) at a[i * rs_a + kp]; rows i >= m are not read; then `extra`.
using Bf16ConvertFn = void (*)(const float* src, index_t ld, index_t rows, index_t kc, std::uint32_t* out,
                               index_t ld_out);
using Bf16RowsUkernelFn = void (*)(index_t kp_count, const std::uint32_t* a, index_t rs_a, const std::uint32_t* b,
                                   float* c, index_t ldc, bool accumulate, int m, int n, const Bf16Extra* extra);
struct Bf16RowsKernels {
  Bf16ConvertFn convert;
  Bf16RowsUkernelFn ukernel;
};
#ifdef FASTREC_HAVE_BF16_KERNELS
const Bf16RowsKernels& bf16_rows_kernels_avx512();  // kernels_avx512_bf16.cpp, as bf16_kernels_avx512
#endif

// ---- the sequential model's bf16 weight gradients (kernels_avx512_bf16_seq.cpp) ----
#ifdef FASTREC_HAVE_BF16_KERNELS
// C (m x n, ldc) = Xᵀ dY over K rows (X: K x m, row stride ldx; dY: K x n, ldy) with bf16_gemm(native, trans_a,
// no trans_b)'s bits: K in blocks of kc_step rows (even, as bf16_gemm's), each block's sums over its row pairs
// in order from zero (VDPBF16PS), C = the first block's, then C = C + each next one's. col_sums (optional, n
// floats) = dY's column sums, each one float32 chain over the rows in order from +0 (row_sum's bits: the bias
// gradient, from the rows already loaded). xbuf: room for ceil(min(kc_step, K) / 2) x (m rounded up to 16)
// words, ybuf for as many pairs x (n rounded up to 16) words plus that row again. Needs avx512_bf16.
void seq_bf16_weight_gradient_avx512(index_t K, index_t kc_step, const float* X, index_t ldx, const float* dY,
                                     index_t ldy, float* C, index_t ldc, index_t m, index_t n, std::uint32_t* xbuf,
                                     std::uint32_t* ybuf, float* col_sums);
#endif

const KernelSet& kernels_scalar();
#ifdef FASTREC_HAVE_X86_KERNELS
const KernelSet& kernels_avx2();
const KernelSet& kernels_avx512();
// The one-row product over a's nonzeros (kernels_avx512.cpp; gemm.cpp's gemm_row): row_nonzeros_avx512 writes
// the positions of a[0..kc)'s nonzeros to idx (kc entries of room) and their count to *nk, and says whether
// skipping the zeros pays; row_kernel_nonzero_avx512 is row_kernel's product over those rows of B only (the
// same numbers), for n a multiple of 64.
bool row_nonzeros_avx512(index_t kc, const float* a, std::int32_t* idx, index_t* nk);
void row_kernel_nonzero_avx512(index_t nk, const std::int32_t* idx, const float* a, const float* b, index_t rs_b,
                               float* c, bool accumulate, int n);
#endif
const KernelSet& kernels_for(Isa isa);

// The approximate top-k's proxy: v (h entries, h a multiple of 32) reordered in place into ActDotsFn's
// pair-split order.
static inline void act_dots_split(float* v, index_t h) {
  float tmp[32];
  for (index_t j = 0; j < h; j += 32) {
    for (int i = 0; i < 16; ++i) {
      tmp[i] = v[j + 2 * i];
      tmp[16 + i] = v[j + 2 * i + 1];
    }
    std::memcpy(v + j, tmp, sizeof tmp);
  }
}

}  // namespace fastrec
