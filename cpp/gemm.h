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

}  // namespace fastrec
