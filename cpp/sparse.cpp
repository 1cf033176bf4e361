#include "sparse.h"

#include <algorithm>

#include "parallel.h"

namespace fastrec {

namespace {
// Rows per parallel chunk: enough work (~16 rows x 20 nonzeros x 64 wide) to amortise scheduling.
constexpr index_t kRowsPerChunk = 16;
}  // namespace

void csr_matmul(const KernelSet& ks, const CsrView& X, const float* W, index_t ldw, index_t n, float* C,
                index_t ldc, const Epilogue* epilogue, int n_threads) {
  const index_t chunks = (X.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int threads = X.indptr[X.rows] * n < (1 << 16) ? 1 : n_threads;
  parallel_for(0, chunks, threads, [&](std::int64_t chunk) {
    const index_t end = std::min<index_t>(X.rows, (chunk + 1) * kRowsPerChunk);
    for (index_t i = chunk * kRowsPerChunk; i < end; ++i) {
      const index_t p = X.indptr[i];
      ks.row_sum(X.data + p, X.indices + p, X.indptr[i + 1] - p, W, ldw, n, C + i * ldc);
      if (epilogue) ks.epilogue(C + i * ldc, ldc, 1, static_cast<int>(n), i, 0, *epilogue);
    }
  });
}

void group_by_column(const CsrView& X, TouchedRows& out) {
  const index_t nnz = X.indptr[X.rows];
  // Sort (column, position) keys: position order is row order, so ties keep rows ascending. O(nnz log nnz),
  // independent of the number of columns.
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(nnz));
  for (index_t p = 0; p < nnz; ++p)
    keys[p] = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(X.indices[p])) << 32) | static_cast<std::uint64_t>(p);
  std::sort(keys.begin(), keys.end());
  std::vector<std::int32_t> row_of(static_cast<std::size_t>(nnz));
  for (index_t i = 0; i < X.rows; ++i)
    for (index_t p = X.indptr[i]; p < X.indptr[i + 1]; ++p) row_of[p] = static_cast<std::int32_t>(i);
  out.ids.clear();
  out.start.clear();
  out.rows.resize(static_cast<std::size_t>(nnz));
  out.values.resize(static_cast<std::size_t>(nnz));
  for (index_t e = 0; e < nnz; ++e) {
    const auto col = static_cast<std::int32_t>(keys[e] >> 32);
    const auto p = static_cast<index_t>(keys[e] & 0xffffffffu);
    if (out.ids.empty() || out.ids.back() != col) {
      out.ids.push_back(col);
      out.start.push_back(e);
    }
    out.rows[e] = row_of[p];
    out.values[e] = X.data[p];
  }
  out.start.push_back(nnz);
}

void csr_transpose_matmul(const KernelSet& ks, const TouchedRows& touched, const float* D, index_t ldd, index_t n,
                          float* G, index_t ldg, int n_threads) {
  const auto count = static_cast<index_t>(touched.ids.size());
  const index_t chunks = (count + kRowsPerChunk - 1) / kRowsPerChunk;
  const int threads = static_cast<index_t>(touched.rows.size()) * n < (1 << 16) ? 1 : n_threads;
  parallel_for(0, chunks, threads, [&](std::int64_t chunk) {
    const index_t end = std::min<index_t>(count, (chunk + 1) * kRowsPerChunk);
    for (index_t g = chunk * kRowsPerChunk; g < end; ++g) {
      const index_t s = touched.start[g];
      ks.row_sum(touched.values.data() + s, touched.rows.data() + s, touched.start[g + 1] - s, D, ldd, n,
                 G + g * ldg);
    }
  });
}

}  // namespace fastrec
