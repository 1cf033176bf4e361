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

// The gradient of the touched rows of a weight table W (width floats per row) from the scattered rows:
//   G[g] = (sum_e values_e * D[rows_e] + alpha * W[ids[g]]) * scale   for each touched row g,
// one pass over the scattered rows of W, split over threads like update_touched_rows (same static chunks, so
// each thread then finds its rows in its own cache). Returns sum_g ||W[ids[g]]||^2 (the L2 term; 0 when
// alpha == 0), added in row order whatever n_threads. row_squares is scratch.
double touched_rows_gradient(const KernelSet& ks, const TouchedRows& touched, const float* D, index_t ldd,
                             const float* W, index_t width, float alpha, float scale, float* G,
                             std::vector<double>& row_squares, int n_threads);

// Applies rule to each touched row W[ids[g]] with gradient G[g] and that row's optimizer state: s1/s2 rows
// of width floats, or for UpdateKind::RowAdagrad one float per row in s1. Rows not named are not read.
void update_touched_rows(const KernelSet& ks, const UpdateRule& rule, const TouchedRows& touched, float* W,
                         index_t width, const float* G, float* s1, float* s2, int n_threads);

}  // namespace fastrec
