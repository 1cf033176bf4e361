// AutoRec's batch: forward over rows, backward grouped by column (see autorec.h for the mathematics).
//
// Determinism: every sum runs in one fixed order on one thread. Row passes own rows (the codes, the outputs of
// a row's entries, dH of the row); column passes own the touched columns (a column's gradient rows sum its
// entries in row order and its optimizer step runs there); the bias and loss sums add per-row / per-column
// parts in order. Threads only split rows or columns, so results do not depend on n_threads.
#include "autorec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "parallel.h"
#include "sparse.h"

namespace fastrec {

namespace {

// Below this many multiply-adds a pass stays on one thread (waking a second costs more: as in gemm.cpp).
constexpr double kMinFmasPerThread = 1 << 18;
// Rows scored per chunk by autorec_predict: bounds the codes' memory (2048 x hidden floats).
constexpr index_t kPredictChunk = 2048;
// How many rows ahead the passes over scattered parameter rows prefetch (as sparse.cpp measured).
constexpr index_t kPrefetchAhead = 8;

void prefetch_row(const float* row, index_t width, bool for_write) {
  for (index_t line = 0; line < width; line += 16) {  // 16 floats = one 64-byte line
    if (for_write)
      __builtin_prefetch(row + line, 1);
    else
      __builtin_prefetch(row + line);
  }
}

int threads_for(double fmas, int n_threads) { return fmas < kMinFmasPerThread ? 1 : n_threads; }

// The workspace of one batch, reused across the batches of an epoch.
struct Workspace {
  std::vector<float> H, dH, delta, ones;
  std::vector<std::int32_t> row_ids;
  std::vector<double> row_loss, col_squares;
  TouchedRows by_col_x, by_col_delta;
  // batch copies of the epoch's rows
  std::vector<std::int64_t> indptr;
  std::vector<std::int32_t> indices;
  std::vector<float> x, t;
};

// Forward and the row part of backward for batch X: ws.H, ws.delta (dL/dout per entry), ws.dH = dL/d(pre-
// activation). Returns the data loss (before the L2 term), already divided by B.
double rows_pass(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, const float* t, Workspace& ws,
                 int n_threads) {
  const index_t B = X.rows, h = m.hidden, nnz = X.indptr[B];
  const float inv_b = 1.0f / static_cast<float>(B);
  ws.H.resize(static_cast<std::size_t>(B * h));
  ws.dH.resize(static_cast<std::size_t>(B * h));
  ws.delta.resize(static_cast<std::size_t>(nnz));
  ws.row_loss.assign(static_cast<std::size_t>(B), 0.0);
  autorec_hidden(ks, m, X, ws.H.data(), n_threads);
  const int threads = threads_for(3.0 * static_cast<double>(nnz) * static_cast<double>(h), n_threads);
  parallel_for(0, B, threads, [&](std::int64_t r) {
    const float* Hr = ws.H.data() + r * h;
    const index_t p0 = X.indptr[r], p1 = X.indptr[r + 1];
    double loss = 0.0;
    for (index_t p = p0; p < p1; ++p) {
      if (p + kPrefetchAhead < p1) prefetch_row(m.W_dec + static_cast<index_t>(X.indices[p + kPrefetchAhead]) * h, h, false);
      const auto c = static_cast<index_t>(X.indices[p]);
      float out;
      ks.dot_rows(m.W_dec + c * h, h, 1, Hr, h, m.b_dec[c], &out);
      const float e = out - t[p];
      loss += 0.5 * static_cast<double>(e) * static_cast<double>(e);
      ws.delta[static_cast<std::size_t>(p)] = e * inv_b;
    }
    ws.row_loss[static_cast<std::size_t>(r)] = loss;
    float* dHr = ws.dH.data() + r * h;
    ks.row_sum(ws.delta.data() + p0, X.indices + p0, p1 - p0, m.W_dec, h, h, dHr);  // count 0: zeros
    Epilogue e;  // dH *= act'(H)
    e.mul = Hr;
    e.ld_mul = h;
    e.mul_act = m.act;
    ks.epilogue(dHr, h, 1, static_cast<int>(h), 0, 0, e);  // e.mul is row r already
  });
  double loss = 0.0;
  for (double l : ws.row_loss) loss += l;
  return loss / static_cast<double>(B);
}

// The column pass: for each touched column c, its gradient rows (decoder, decoder bias, encoder), handed to
// sink(c, g_dec, g_bias, g_enc) on the thread that owns c; then the encoder bias gradient to bias_sink.
// Returns the L2 term.
// prefetch: further tables of n_cols rows of `hidden` floats that sink reads and writes (the optimizer state):
// their rows are fetched ahead with the parameters' (each a random 2 KB row at hidden 500: fetched on demand,
// the pass waits on memory latency instead of bandwidth).
template <class ColumnSink, class BiasSink>
double columns_pass(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, float l2, Workspace& ws,
                    const std::vector<float*>& prefetch, ColumnSink&& sink, BiasSink&& bias_sink, int n_threads) {
  const index_t B = X.rows, h = m.hidden, nnz = X.indptr[B];
  const float inv_b = 1.0f / static_cast<float>(B), decay = l2 * inv_b;
  group_by_column(X, ws.by_col_x);
  const CsrView by_delta{X.indptr, X.indices, ws.delta.data(), X.rows, X.cols};
  group_by_column(by_delta, ws.by_col_delta);
  const TouchedRows &tx = ws.by_col_x, &td = ws.by_col_delta;
  const auto count = static_cast<index_t>(tx.ids.size());
  ws.col_squares.assign(static_cast<std::size_t>(count), 0.0);
  const int threads = threads_for(2.0 * static_cast<double>(nnz) * static_cast<double>(h), n_threads);
  parallel_for(0, count, threads, [&](std::int64_t g) {
    thread_local std::vector<float> buffers;
    buffers.resize(static_cast<std::size_t>(2 * h));
    float *g_dec = buffers.data(), *g_enc = buffers.data() + h;
    if (g + kPrefetchAhead < count) {
      const auto ahead = static_cast<index_t>(tx.ids[g + kPrefetchAhead]);
      prefetch_row(m.W_dec + ahead * h, h, true);
      prefetch_row(m.W_enc + ahead * h, h, true);
      for (float* table : prefetch) prefetch_row(table + ahead * h, h, true);
    }
    const auto c = static_cast<index_t>(tx.ids[g]);
    const index_t s = tx.start[g], n = tx.start[g + 1] - s;
    ks.row_sum(td.values.data() + s, td.rows.data() + s, n, ws.H.data(), h, h, g_dec);
    ks.row_sum(tx.values.data() + s, tx.rows.data() + s, n, ws.dH.data(), h, h, g_enc);
    float g_bias = 0.0f;
    for (index_t e = 0; e < n; ++e) g_bias += td.values[static_cast<std::size_t>(s + e)];
    float *w_dec = m.W_dec + c * h, *w_enc = m.W_enc + c * h;
    if (l2 != 0.0f) {
      ws.col_squares[static_cast<std::size_t>(g)] = ks.sum_squares(w_dec, h) + ks.sum_squares(w_enc, h);
      for (index_t j = 0; j < h; ++j) g_dec[j] += decay * w_dec[j];
      for (index_t j = 0; j < h; ++j) g_enc[j] += decay * w_enc[j];
    }
    sink(c, g_dec, g_bias, g_enc);
  });
  ws.ones.assign(static_cast<std::size_t>(B), 1.0f);
  ws.row_ids.resize(static_cast<std::size_t>(B));
  for (index_t r = 0; r < B; ++r) ws.row_ids[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r);
  std::vector<float> g_b_enc(static_cast<std::size_t>(h));
  ks.row_sum(ws.ones.data(), ws.row_ids.data(), B, ws.dH.data(), h, h, g_b_enc.data());
  bias_sink(g_b_enc.data());
  double squares = 0.0;
  for (double q : ws.col_squares) squares += q;
  return 0.5 * static_cast<double>(decay) * squares;
}

float* state_at(const std::vector<float*>& state, std::size_t i) { return state.empty() ? nullptr : state[i]; }

}  // namespace

void autorec_hidden(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, float* H, int n_threads) {
  Epilogue e;
  e.bias = m.b_enc;
  e.act = m.act;
  csr_matmul(ks, X, m.W_enc, m.hidden, m.hidden, H, m.hidden, &e, n_threads);
}

void autorec_predict(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, const std::int64_t* q_indptr,
                     const std::int32_t* q_cols, float* out, int n_threads) {
  const index_t h = m.hidden;
  std::vector<float> H(static_cast<std::size_t>(std::min(X.rows, kPredictChunk) * h));
  for (index_t r0 = 0; r0 < X.rows; r0 += kPredictChunk) {
    CsrView chunk = X;  // indices stay absolute: indptr offsets index the full arrays
    chunk.indptr += r0;
    chunk.rows = std::min(kPredictChunk, X.rows - r0);
    autorec_hidden(ks, m, chunk, H.data(), n_threads);
    const double fmas = static_cast<double>(q_indptr[r0 + chunk.rows] - q_indptr[r0]) * static_cast<double>(h);
    parallel_for(0, chunk.rows, threads_for(fmas, n_threads), [&](std::int64_t i) {
      const index_t r = r0 + i;
      for (index_t q = q_indptr[r]; q < q_indptr[r + 1]; ++q) {
        const auto c = static_cast<index_t>(q_cols[q]);
        ks.dot_rows(m.W_dec + c * h, h, 1, H.data() + i * h, h, m.b_dec[c], out + q);
      }
    });
  }
}

double autorec_loss_and_gradients(const KernelSet& ks, const AutoRecModel& m, const CsrView& X, const float* t,
                                  float l2, float* g_W_enc, float* g_b_enc, float* g_W_dec, float* g_b_dec,
                                  int n_threads) {
  require(X.rows > 0, "X must have at least one row");
  const index_t h = m.hidden;
  const std::size_t table = static_cast<std::size_t>(m.n_cols * h) * sizeof(float);
  std::memset(g_W_enc, 0, table);
  std::memset(g_W_dec, 0, table);
  std::memset(g_b_dec, 0, static_cast<std::size_t>(m.n_cols) * sizeof(float));
  Workspace ws;
  const double data = rows_pass(ks, m, X, t, ws, n_threads);
  const double reg = columns_pass(
      ks, m, X, l2, ws, {},
      [&](index_t c, const float* g_dec, float g_bias, const float* g_enc) {
        std::memcpy(g_W_dec + c * h, g_dec, static_cast<std::size_t>(h) * sizeof(float));
        std::memcpy(g_W_enc + c * h, g_enc, static_cast<std::size_t>(h) * sizeof(float));
        g_b_dec[c] = g_bias;
      },
      [&](const float* g) { std::memcpy(g_b_enc, g, static_cast<std::size_t>(h) * sizeof(float)); }, n_threads);
  return data + reg;
}

EpochResult autorec_train_epoch(const KernelSet& ks, const AutoRecModel& m, Optimizer& opt, const CsrView& X,
                                const float* t, const std::int64_t* order, index_t n_order, index_t batch_size,
                                float l2, const StopCheck& stop, int n_threads) {
  const index_t h = m.hidden;
  Workspace ws;
  EpochResult result;
  BatchThreads batch_threads(n_threads);
  for (index_t begin = 0; begin < n_order; begin += batch_size) {
    if (stop && stop(begin)) break;
    const int threads = batch_threads.next();
    const index_t n = std::min(batch_size, n_order - begin);
    // The batch's rows, copied in order (their entries stay in column order).
    ws.indptr.assign(1, 0);
    ws.indices.clear();
    ws.x.clear();
    ws.t.clear();
    for (index_t i = 0; i < n; ++i) {
      const index_t r = order[begin + i], p0 = X.indptr[r], p1 = X.indptr[r + 1];
      ws.indices.insert(ws.indices.end(), X.indices + p0, X.indices + p1);
      ws.x.insert(ws.x.end(), X.data + p0, X.data + p1);
      ws.t.insert(ws.t.end(), t + p0, t + p1);
      ws.indptr.push_back(static_cast<std::int64_t>(ws.indices.size()));
    }
    const CsrView batch{ws.indptr.data(), ws.indices.data(), ws.x.data(), n, X.cols};
    const double data = rows_pass(ks, m, batch, ws.t.data(), ws, threads);
    const std::int64_t step_before = opt.adam_t;
    if (!std::isfinite(data)) {
      end_batch(result, opt, step_before, true, data, n);
      break;
    }
    UpdateRule rule = opt.next_step();
    if (rule.kind == UpdateKind::Sgd) rule.kind = UpdateKind::PlainSgd;  // no velocity for lazily updated rows
    const bool adam = rule.kind == UpdateKind::Adam;
    float *s1_We = adam ? state_at(opt.state1, 0) : nullptr, *s2_We = adam ? state_at(opt.state2, 0) : nullptr;
    float *s1_be = adam ? state_at(opt.state1, 1) : nullptr, *s2_be = adam ? state_at(opt.state2, 1) : nullptr;
    float *s1_Wd = adam ? state_at(opt.state1, 2) : nullptr, *s2_Wd = adam ? state_at(opt.state2, 2) : nullptr;
    float *s1_bd = adam ? state_at(opt.state1, 3) : nullptr, *s2_bd = adam ? state_at(opt.state2, 3) : nullptr;
    std::vector<float*> state_rows;
    for (float* table : {s1_We, s2_We, s1_Wd, s2_Wd})
      if (table) state_rows.push_back(table);
    const double reg = columns_pass(
        ks, m, batch, l2, ws, state_rows,
        [&](index_t c, const float* g_dec, float g_bias, const float* g_enc) {
          const index_t at = c * h;
          ks.update(rule, m.W_dec + at, g_dec, s1_Wd ? s1_Wd + at : nullptr, s2_Wd ? s2_Wd + at : nullptr, h);
          ks.update(rule, m.W_enc + at, g_enc, s1_We ? s1_We + at : nullptr, s2_We ? s2_We + at : nullptr, h);
          ks.update(rule, m.b_dec + c, &g_bias, s1_bd ? s1_bd + c : nullptr, s2_bd ? s2_bd + c : nullptr, 1);
        },
        [&](const float* g) { ks.update(rule, m.b_enc, g, s1_be, s2_be, h); }, threads);
    if (!end_batch(result, opt, step_before, false, data + reg, n)) break;
    batch_threads.done(n);
  }
  return result;
}

}  // namespace fastrec
