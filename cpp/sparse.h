// The sparse kernels shared by CSR input layers and (later) embedding tables:
//   forward  "CSR times matrix": C[i] = sum_p X.data[p] * W[X.indices[p]]  (gathers rows of W)
//   backward "scatter rows":     G[r] = sum_i X[i][r] * D[i] for each touched row r of W only.
// Neither touches a row of W that the batch does not name, so their cost is independent of W's height.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"

namespace fastrec {

// C (X.rows x n, ldc) = X W (W has ldw, at least X.cols rows), then the epilogue per row.
void csr_matmul(const KernelSet& ks, const CsrView& X, const float* W, index_t ldw, index_t n, float* C,
                index_t ldc, const Epilogue* epilogue, int n_threads);

// The stored entries of a CSR batch grouped by column: column ids[g] has entries start[g]..start[g+1] of
// (rows, values), in increasing row order. Explicit zeros count as touched.
struct TouchedRows {
  std::vector<std::int32_t> ids;
  std::vector<std::int64_t> start;
  std::vector<std::int32_t> rows;
  std::vector<float> values;
  std::vector<std::int32_t> scratch_a, scratch_b;  // kept between calls to avoid reallocating every step
};
void group_by_column(const CsrView& X, TouchedRows& out);

// G (touched.ids.size() x n, ldg) = rows of X^T D for the touched columns. Each row has one owner thread.
void csr_transpose_matmul(const KernelSet& ks, const TouchedRows& touched, const float* D, index_t ldd, index_t n,
                          float* G, index_t ldg, int n_threads);

}  // namespace fastrec
