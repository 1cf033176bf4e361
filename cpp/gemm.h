// fastrec's single-precision matrix multiply, BLIS style.
//
// Contract: C (M x N, row-major, leading dimension ldc) = op(A) * op(B), then the epilogue (kernels.h).
//   op(A) is M x K: A row-major with lda (trans_a = false) or A stored K x M with lda (trans_a = true).
//   op(B) is K x N: B row-major with ldb (trans_b = false) or B stored N x K with ldb (trans_b = true).
// C is written, never read before the first K block (beta = 0). K = 0 gives C = epilogue(0).
// Threads split C into disjoint rectangles (never K), and every element is the same FMA chain over K in
// the same order whatever M, its tile or n_threads: results are bitwise reproducible. (N = 1 runs as a
// matrix-vector product, whose dot products sum in 16 lanes: the same for any M and n_threads, but not
// bitwise the column of an N > 1 product.)
#pragma once
#include "common.h"
#include "kernels/kernels.h"

namespace fastrec {

void sgemm(const KernelSet& kernels, bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const float* A,
           index_t lda, const float* B, index_t ldb, float* C, index_t ldc, const Epilogue* epilogue, int n_threads);

// sgemm of one row (M = 1, no transposes, one thread): c (N) = a (K) B (K x N, ldb), then the epilogue, with
// the same numbers as sgemm; without its dispatch (the single-row serving path).
void sgemm_row(const KernelSet& kernels, index_t N, index_t K, const float* a, const float* B, index_t ldb, float* c,
               const Epilogue* epilogue);

// bfloat16 products: sgemm's contract with every element of op(A) and op(B) rounded to bf16 (to nearest, ties
// to even; kernels.h bf16_round_bits) while packing, the products (exact in float32) summed in float32, C
// float32. native (isa.h resolve_bf16_kernel): the AVX512-BF16 micro-kernel (VDPBF16PS adds a pair of k's
// products per lane, pairs in k order); otherwise the float32 kernels of ks on the rounded panels (every
// operand packed, any CPU). ks also applies the epilogue (exp_sums is not supported). Threads split C as
// sgemm does, so each element is one fixed chain over K: bitwise reproducible for any n_threads with a given
// kernel (native and emulated sums round differently, both within the float32 accumulation bound).
void bf16_gemm(const KernelSet& ks, bool native, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
               const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc, const Epilogue* epilogue,
               int n_threads);

// bf16_gemm with the same bits, faster where op(A) is row-major with many rows and N is narrow (the sequential
// model's projections and input gradients: M = a batch's event rows, N and K 64-192; the MLP's forward and
// delta products, mlp.cpp layer_gemm): the native kernel reads A's rows in place after converting each block
// of rows to bf16 once (no MR panels, whose packing cost as much as the products at these widths). trans_a,
// or the emulated kernel: bf16_gemm itself.
void bf16_gemm_rows(const KernelSet& ks, bool native, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
                    const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc,
                    const Epilogue* epilogue, int n_threads);

// The sequential model's dropout residual with the native bf16 kernel: x (M x N, ld_x) += (A B + bias) * mask
// (mask M x N, ld_x), A row-major M x K, B K x N, each element's operations those of the product with a bias
// epilogue followed by x[i] += t[i] * mask[i] (the same bits), in the rows kernel's registers (no product
// matrix written and read back). Returns false, doing nothing, where it does not apply (not native, or K over
// one K block: x would take partial sums): the caller then takes the two steps itself.
bool bf16_gemm_rows_residual(const KernelSet& ks, bool native, index_t M, index_t N, index_t K, const float* A,
                             index_t lda, const float* B, index_t ldb, const float* bias, const float* mask, float* x,
                             index_t ld_x, int n_threads);

// The K blocks of every bf16 product: equal even blocks of at most kc (1100 = 2 x 550, not 1024 + 76: a short
// last block pays the C tile's load and store for few k). They depend on K only: the same sums for any split
// of C, and for any kernel that takes the same blocks in the same pair order (sequential.cpp's weight gradient).
index_t bf16_kc_step(index_t K, index_t kc);

}  // namespace fastrec
