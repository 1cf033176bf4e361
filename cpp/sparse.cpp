#include "sparse.h"

#include <algorithm>

#include "parallel.h"

namespace fastrec {

namespace {
// Rows per parallel chunk: enough work (~16 rows x 20 nonzeros x 64 wide) to amortise scheduling.
constexpr index_t kRowsPerChunk = 16;
// Element count below which a pass over touched rows stays on one thread.
constexpr index_t kElementsPerThread = 1 << 15;
// How many scattered rows ahead to prefetch (measured 4, 8, 16, 32 on the 10^7-column benchmark: 4 and 8
// best; further ahead evicts rows before their use).
constexpr index_t kPrefetchRows = 8;

// out = sum_e weights[e] * M[ids[e]] over count entries (row_sum); a single entry (an id field's row, a
// column touched once) is one scaled copy, without a kernel call's overhead.
void weighted_rows(const KernelSet& ks, const float* weights, const std::int32_t* ids, index_t count, const float* M,
                   index_t ld, index_t n, float* out) {
  if (count != 1) return ks.row_sum(weights, ids, count, M, ld, n, out);
  const float w = weights[0], *row = M + static_cast<index_t>(ids[0]) * ld;
  for (index_t j = 0; j < n; ++j) out[j] = w * row[j];
}

void prefetch_row(const float* row, index_t width, bool for_write) {
  for (index_t line = 0; line < width; line += 16) {  // 16 floats = one 64-byte line
    if (for_write)
      __builtin_prefetch(row + line, 1);
    else
      __builtin_prefetch(row + line);
  }
}
}  // namespace

void csr_matmul(const KernelSet& ks, const CsrView& X, const float* W, index_t ldw, index_t n, float* C,
                index_t ldc, const Epilogue* epilogue, int n_threads) {
  const index_t chunks = (X.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int threads = X.indptr[X.rows] * n < (1 << 16) ? 1 : n_threads;
  parallel_for(0, chunks, threads, [&](std::int64_t chunk) {
    const index_t end = std::min<index_t>(X.rows, (chunk + 1) * kRowsPerChunk);
    for (index_t i = chunk * kRowsPerChunk; i < end; ++i) {
      // row_sum prefetches within a row's entries; a one-id bag has none ahead, so the next rows' first
      // entries are prefetched here.
      if (i + kPrefetchRows < X.rows)
        for (index_t q = X.indptr[i + kPrefetchRows], q1 = std::min(q + 4, X.indptr[i + kPrefetchRows + 1]); q < q1; ++q)
          prefetch_row(W + static_cast<index_t>(X.indices[q]) * ldw, n, false);
      const index_t p = X.indptr[i];
      weighted_rows(ks, X.data + p, X.indices + p, X.indptr[i + 1] - p, W, ldw, n, C + i * ldc);
      if (epilogue) ks.epilogue(C + i * ldc, ldc, 1, static_cast<int>(n), i, 0, *epilogue);
    }
  });
}

void group_by_column(const CsrView& X, TouchedRows& out) {
  const index_t nnz = X.indptr[X.rows];
  // Stable LSD radix sort of entry positions by column id (stability keeps each column's entries in row
  // order). O(nnz + buckets) per pass whatever the number of columns: the digit width follows nnz (a small
  // batch would otherwise spend its time clearing and summing 2048 counters), and the passes stop at the
  // largest id's top bit.
  std::int32_t max_id = 0;
  for (index_t p = 0; p < nnz; ++p) max_id = std::max(max_id, X.indices[p]);
  int id_bits = 0;
  while (id_bits < 31 && (max_id >> id_bits) != 0) ++id_bits;
  constexpr int kMinDigitBits = 4, kMaxDigitBits = 11;
  int nnz_bits = 0;
  while (nnz_bits < kMaxDigitBits && (nnz >> nnz_bits) != 0) ++nnz_bits;
  const int digit_bits = std::max(nnz_bits, kMinDigitBits);
  const int passes = (id_bits + digit_bits - 1) / digit_bits;
  const int bits = passes > 0 ? (id_bits + passes - 1) / passes : 0;  // equal digits of at most digit_bits
  const std::int32_t mask = (std::int32_t{1} << bits) - 1;
  std::vector<std::int32_t>& pos = out.scratch_a;
  std::vector<std::int32_t>& tmp = out.scratch_b;
  pos.resize(static_cast<std::size_t>(nnz));
  tmp.resize(static_cast<std::size_t>(nnz));
  for (index_t p = 0; p < nnz; ++p) pos[p] = static_cast<std::int32_t>(p);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * bits;
    index_t count[(1 << kMaxDigitBits) + 1];
    std::fill(count, count + mask + 2, 0);
    for (index_t p = 0; p < nnz; ++p) ++count[((X.indices[p] >> shift) & mask) + 1];
    for (std::int32_t d = 0; d < mask; ++d) count[d + 1] += count[d];
    for (index_t e = 0; e < nnz; ++e) {
      const std::int32_t p = pos[e];
      tmp[count[(X.indices[p] >> shift) & mask]++] = p;
    }
    pos.swap(tmp);
  }
  // Row of each stored entry, then the grouped arrays.
  std::vector<std::int32_t>& row_of = tmp;
  for (index_t i = 0; i < X.rows; ++i)
    for (index_t p = X.indptr[i]; p < X.indptr[i + 1]; ++p) row_of[p] = static_cast<std::int32_t>(i);
  out.ids.clear();
  out.start.clear();
  out.rows.resize(static_cast<std::size_t>(nnz));
  out.values.resize(static_cast<std::size_t>(nnz));
  for (index_t e = 0; e < nnz; ++e) {
    const std::int32_t p = pos[e];
    const std::int32_t col = X.indices[p];
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
      weighted_rows(ks, touched.values.data() + s, touched.rows.data() + s, touched.start[g + 1] - s, D, ldd, n,
                    G + g * ldg);
    }
  });
}

double touched_rows_gradient(const KernelSet& ks, const TouchedRows& touched, const float* D, index_t ldd,
                             const float* W, index_t width, float alpha, float scale, float* G,
                             std::vector<double>& row_squares, int n_threads) {
  const auto count = static_cast<index_t>(touched.ids.size());
  csr_transpose_matmul(ks, touched, D, ldd, width, G, width, n_threads);
  row_squares.assign(static_cast<std::size_t>(count), 0.0);
  parallel_for(0, count, count * width < kElementsPerThread ? 1 : n_threads, [&](std::int64_t g) {
    float* row = G + g * width;
    if (alpha == 0.0f) {  // W is not read: its rows are scattered, each one a cache miss
      for (index_t j = 0; j < width; ++j) row[j] *= scale;
      return;
    }
    if (g + kPrefetchRows < count)
      prefetch_row(W + static_cast<index_t>(touched.ids[g + kPrefetchRows]) * width, width, false);
    const float* w = W + static_cast<index_t>(touched.ids[g]) * width;
    row_squares[g] = ks.sum_squares(w, width);
    for (index_t j = 0; j < width; ++j) row[j] = (row[j] + alpha * w[j]) * scale;
  });
  double squares = 0.0;
  for (double r : row_squares) squares += r;
  return squares;
}

void update_touched_rows(const KernelSet& ks, const UpdateRule& rule, const TouchedRows& touched, float* W,
                         index_t width, const float* G, float* s1, float* s2, int n_threads) {
  const auto count = static_cast<index_t>(touched.ids.size());
  const index_t state_width = rule.kind == UpdateKind::RowAdagrad ? 1 : width;
  parallel_for(0, count, count * width < kElementsPerThread ? 1 : n_threads, [&](std::int64_t g) {
    if (g + kPrefetchRows < count) {
      const auto ahead = static_cast<index_t>(touched.ids[g + kPrefetchRows]);
      prefetch_row(W + ahead * width, width, true);
      if (s1) prefetch_row(s1 + ahead * state_width, state_width, true);
      if (s2) prefetch_row(s2 + ahead * width, width, true);
    }
    const auto id = static_cast<index_t>(touched.ids[g]);
    ks.update(rule, W + id * width, G + g * width, s1 ? s1 + id * state_width : nullptr, s2 ? s2 + id * width : nullptr,
              width);
  });
}

}  // namespace fastrec
