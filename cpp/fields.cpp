#include "fields.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include "aligned.h"
#include "gemm.h"
#include "parallel.h"
#include "sparse.h"

namespace fastrec {

namespace {

// Examples per forward chunk in predict/top-k: bounds the workspace, still a full-speed GEMM.
constexpr index_t kPredictChunk = 2048;
constexpr index_t kMinChosenRows = 256;  // smaller predict batches take no part in the thread choice

bool contains_sorted(const std::int32_t* begin, const std::int32_t* end, std::int32_t value) {
  return std::binary_search(begin, end, value);
}

}  // namespace

// Buffers of one minibatch.
struct FieldWorkspace {
  MlpWorkspace mlp;
  std::vector<std::vector<std::int32_t>> keys;  // batch key columns
  std::vector<float> y, weight, x, dx, logits;
  std::vector<float> wide;  // pooled scalar of the wide field being processed (n)
  std::vector<std::vector<float>> pooled_gmf, d_gmf;  // GMF fields' pooled vectors and their gradients (u, v)
  struct FieldBatch {
    std::vector<std::int64_t> indptr, rows;  // rows: the bag row each batch row reads
    std::vector<std::int32_t> ids;
    std::vector<float> weights;
    TouchedRows touched;
    std::vector<float> grad;
    std::vector<double> row_squares;
  };
  std::vector<FieldBatch> fields;
  std::vector<double> field_squares;  // each field's L2 sum, added to the loss in field order
  std::vector<float> gmf_grad;
  // Per chunk of kGradientChunkRows batch rows: the data loss sum, and the GMF weight gradient sum (dim each).
  std::vector<double> loss_parts;
  std::vector<float> gmf_parts;

  FieldWorkspace(const FieldModel& m, index_t rows, bool training)
      : mlp(m.mlp, rows, false, training), keys(static_cast<std::size_t>(m.n_keys)), fields(m.fields.size()) {
    x.resize(static_cast<std::size_t>(rows * m.width));
    if (training) dx.resize(x.size());
    logits.resize(static_cast<std::size_t>(rows));
    wide.resize(static_cast<std::size_t>(rows));
    const index_t chunks = (rows + kGradientChunkRows - 1) / kGradientChunkRows;
    if (training) loss_parts.resize(static_cast<std::size_t>(chunks));
    if (m.gmf.field_u >= 0) {
      const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
      pooled_gmf.assign(2, std::vector<float>(static_cast<std::size_t>(rows * d)));
      if (training) d_gmf.assign(2, std::vector<float>(static_cast<std::size_t>(rows * d)));
      if (training) gmf_parts.resize(static_cast<std::size_t>(chunks * d));
      gmf_grad.resize(static_cast<std::size_t>(d));
    }
  }
};

namespace {

// The bags of the batch rows of field f, as a CSR over the field's vocabulary. With a random stream
// (training), each example reads bag row 0 instead of its own with probability f.dropout.
CsrView gather_bags(const EmbeddingField& f, const std::vector<std::int32_t>& keys, index_t n,
                    FieldWorkspace::FieldBatch& fb, std::uint64_t* rng) {
  // Two passes (bag of each row and offsets, then the copies): most bags hold one id, and a vector insert
  // per row cost a memmove call each.
  fb.indptr.resize(static_cast<std::size_t>(n + 1));
  fb.rows.resize(static_cast<std::size_t>(n));
  fb.indptr[0] = 0;
  const bool drop = rng && f.dropout > 0.0f;
  if (f.bags.shape != BagTable::Shape::Any) {
    fb.ids.resize(static_cast<std::size_t>(n));
    fb.weights.assign(static_cast<std::size_t>(n), 1.0f);
    const bool identity = f.bags.shape == BagTable::Shape::Identity;
    for (index_t r = 0; r < n; ++r) {
      std::int32_t q = keys[static_cast<std::size_t>(r)];
      if (drop && uniform01(*rng) < f.dropout) q = 0;
      fb.rows[r] = q;
      fb.indptr[r + 1] = r + 1;
      fb.ids[r] = identity ? q : f.bags.ids[q];
    }
    return CsrView{fb.indptr.data(), fb.ids.data(), fb.weights.data(), n, f.vocab};
  }
  for (index_t r = 0; r < n; ++r) {
    index_t q = keys[static_cast<std::size_t>(r)];
    if (drop && uniform01(*rng) < f.dropout) q = 0;
    fb.rows[r] = q;
    fb.indptr[r + 1] = fb.indptr[r] + (f.bags.indptr[q + 1] - f.bags.indptr[q]);
  }
  fb.ids.resize(static_cast<std::size_t>(fb.indptr[n]));
  fb.weights.resize(static_cast<std::size_t>(fb.indptr[n]));
  for (index_t r = 0; r < n; ++r) {
    const index_t p0 = f.bags.indptr[fb.rows[r]], out = fb.indptr[r], len = fb.indptr[r + 1] - out;
    for (index_t j = 0; j < len; ++j) {
      fb.ids[out + j] = f.bags.ids[p0 + j];
      fb.weights[out + j] = f.bags.weights[p0 + j];
    }
  }
  return CsrView{fb.indptr.data(), fb.ids.data(), fb.weights.data(), n, f.vocab};
}

// The threads for the fields of a batch of n rows: a small batch (a single-row prediction) stays on the
// calling thread, since waking another costs more.
int field_threads(const FieldModel& m, index_t n, int n_threads) {
  constexpr index_t kMinParallelFloats = 1 << 14;  // pooled floats per batch
  index_t floats = 0;
  for (const EmbeddingField& f : m.fields) floats += n * f.dim;
  return floats < kMinParallelFloats ? 1 : resolve_threads(n_threads);
}

// Whether the fields run one per thread: with at least as many fields as threads (their lookups and updates
// are independent: each field owns its table, state and workspace).
bool fields_spread(const FieldModel& m, int threads) {
  return threads > 1 && static_cast<int>(m.fields.size()) >= threads;
}

// Runs body(i, threads) for every field i of a batch of n rows: spread over the threads, each field on one,
// or one field after another, each on all threads.
template <class Body>
void for_each_field(const FieldModel& m, index_t n, int n_threads, Body&& body) {
  const auto fields = static_cast<std::int64_t>(m.fields.size());
  const int threads = field_threads(m, n, n_threads);
  if (fields_spread(m, threads)) {
    parallel_for<true>(0, fields, threads, [&](std::int64_t i) { body(static_cast<std::size_t>(i), 1); });
  } else {
    for (std::int64_t i = 0; i < fields; ++i) body(static_cast<std::size_t>(i), threads);
  }
}

// Each field's bags for the batch in ws.keys (ws.fields[i]: a CSR over the field's vocabulary, whose rows
// logits_rows pools). dropout_stream: training's seed for field dropout (none when predicting).
void batch_bags(const FieldModel& m, index_t n, FieldWorkspace& ws, int n_threads,
                const std::uint64_t* dropout_stream = nullptr) {
  for_each_field(m, n, n_threads, [&](std::size_t i, int) {
    // Each field draws its dropout from its own stream: the draws do not depend on which thread ran it.
    std::uint64_t seed = dropout_stream ? *dropout_stream + i : 0;
    std::uint64_t rng = splitmix64(seed);
    gather_bags(m.fields[i], ws.keys[static_cast<std::size_t>(m.fields[i].key)], n, ws.fields[i],
                dropout_stream ? &rng : nullptr);
  });
}

// The MLP's input: x, n rows.
Input mlp_input(const FieldModel& m, index_t n, FieldWorkspace& ws) {
  Input in;
  in.dense = ws.x.data();
  in.ld = m.width;
  in.rows = n;
  in.cols = m.width;
  return in;
}

// Rows [r0, r1) of x (pooled fields, dense blocks) and of the GMF fields' pooled vectors, from the batch's
// bags (batch_bags).
void pool_rows(const KernelSet& ks, const FieldModel& m, FieldWorkspace& ws, index_t r0, index_t r1, int n_threads) {
  for_each_field(m, r1 - r0, n_threads, [&](std::size_t i, int threads) {
    const EmbeddingField& f = m.fields[i];
    const FieldWorkspace::FieldBatch& fb = ws.fields[i];
    // indptr offsets index the whole batch's ids and weights
    const CsrView bags{fb.indptr.data() + r0, fb.ids.data(), fb.weights.data(), r1 - r0, f.vocab};
    if (f.offset >= 0)
      csr_matmul(ks, bags, f.table, f.dim, f.dim, ws.x.data() + r0 * m.width + f.offset, m.width, nullptr, threads);
    if (static_cast<int>(i) == m.gmf.field_u || static_cast<int>(i) == m.gmf.field_v) {
      const std::size_t slot = static_cast<int>(i) == m.gmf.field_u ? 0 : 1;
      csr_matmul(ks, bags, f.table, f.dim, f.dim, ws.pooled_gmf[slot].data() + r0 * f.dim, f.dim, nullptr, threads);
    }
  });
  for (const DenseBlock& b : m.dense) {
    const std::vector<std::int32_t>& keys = ws.keys[static_cast<std::size_t>(b.key)];
    constexpr index_t kAhead = 8;  // rows of a table that may not fit the cache: prefetch the next ones
    for (index_t r = r0; r < r1; ++r) {
      if (r + kAhead < r1) __builtin_prefetch(b.table + static_cast<index_t>(keys[r + kAhead]) * b.cols);
      std::memcpy(ws.x.data() + r * m.width + b.offset, b.table + static_cast<index_t>(keys[r]) * b.cols,
                  sizeof(float) * static_cast<std::size_t>(b.cols));
    }
  }
}

// Rows [r0, r1) of ws.logits from the batch's bags: pooled inputs, the MLP, wide fields' pooled scalars, the
// GMF term. The rows of a block are pooled by the thread that runs their MLP pass.
void logits_rows(const KernelSet& ks, const FieldModel& m, index_t n, FieldWorkspace& ws, index_t r0, index_t r1,
                 int n_threads) {
  pool_rows(ks, m, ws, r0, r1, n_threads);
  forward_rows(ks, m.mlp, mlp_input(m, n, ws), ws.mlp, r0, r1, n_threads);
  const float* z = ws.mlp.acts[m.mlp.layers.size()].data();
  for (index_t r = r0; r < r1; ++r) ws.logits[r] = z[r];
  for (std::size_t i = 0; i < m.fields.size(); ++i) {  // wide fields: their pooled scalar joins the logit
    const EmbeddingField& f = m.fields[i];
    if (!f.wide) continue;
    const FieldWorkspace::FieldBatch& fb = ws.fields[i];
    // indptr offsets index the whole batch's ids and weights
    const CsrView bags{fb.indptr.data() + r0, fb.ids.data(), fb.weights.data(), r1 - r0, f.vocab};
    csr_matmul(ks, bags, f.table, 1, 1, ws.wide.data() + r0, 1, nullptr, n_threads);
    for (index_t r = r0; r < r1; ++r) ws.logits[r] += ws.wide[r];
  }
  if (m.gmf.field_u >= 0) {
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
    const float *u = ws.pooled_gmf[0].data(), *v = ws.pooled_gmf[1].data();
    for (index_t r = r0; r < r1; ++r) {
      float s = 0.0f;
      for (index_t j = 0; j < d; ++j) s += m.gmf.w[j] * u[r * d + j] * v[r * d + j];
      ws.logits[r] += s;
    }
  }
}

// ws.logits[0:n] from the batch's bags, in the MLP's row blocks.
void batch_logits(const KernelSet& ks, const FieldModel& m, index_t n, FieldWorkspace& ws, int n_threads) {
  const int blocks = row_blocks(m.mlp, n, n_threads);
  if (blocks == 1) return logits_rows(ks, m, n, ws, 0, n, n_threads);
  parallel_for(0, blocks, blocks, [&](std::int64_t b) {
    const auto [r0, r1] = block_rows(n, blocks, b);
    logits_rows(ks, m, n, ws, r0, r1, 1);
  });
}

// Rows [r0, r1) of the output gradient D = dLoss/dlogit times n (the MLP applies 1/n) and of the GMF
// vectors' gradients, from the logits; per chunk of kGradientChunkRows rows, the data loss sum and the GMF
// weight gradient sum (batch_backward adds them in chunk order: the same for any thread count).
void loss_rows(const FieldModel& m, FieldWorkspace& ws, index_t r0, index_t r1) {
  float* D = ws.mlp.deltas.back().data();
  for (index_t c0 = r0; c0 < r1; c0 += kGradientChunkRows) {
    const index_t c1 = std::min(r1, c0 + kGradientChunkRows), chunk = c0 / kGradientChunkRows;
    double loss = 0.0;
    for (index_t r = c0; r < c1; ++r) {
      const float z = ws.logits[r], y = ws.y[r], s = ws.weight.empty() ? 1.0f : ws.weight[r];
      if (m.bce()) {  // softplus(z) and sigmoid(z) (as stable_sigmoid computes it) share e^-|z|
        const float e = std::exp(-std::fabs(z));
        loss += static_cast<double>(s) * (std::max(z, 0.0f) + std::log1p(e) - y * z);
        D[r] = s * ((z >= 0.0f ? 1.0f : e) / (1.0f + e) - y);
      } else {
        loss += 0.5 * static_cast<double>(s) * (z - y) * (z - y);
        D[r] = s * (z - y);
      }
    }
    ws.loss_parts[static_cast<std::size_t>(chunk)] = loss;
    if (m.gmf.field_u < 0) continue;
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;  // with w before its update
    const float *u = ws.pooled_gmf[0].data(), *v = ws.pooled_gmf[1].data();
    float *du = ws.d_gmf[0].data(), *dv = ws.d_gmf[1].data(), *g = ws.gmf_parts.data() + chunk * d;
    std::fill(g, g + d, 0.0f);
    for (index_t r = c0; r < c1; ++r)
      for (index_t j = 0; j < d; ++j) {
        g[j] += D[r] * u[r * d + j] * v[r * d + j];
        du[r * d + j] = D[r] * m.gmf.w[j] * v[r * d + j];
        dv[r * d + j] = D[r] * m.gmf.w[j] * u[r * d + j];
      }
  }
}

// The batch's logits (from its bags, batch_bags), loss and gradients: the MLP's forward and backward
// passes run in its row blocks, one block per thread without waiting in between (BlockPrologue); then the
// gradients go to mlp_sink, the GMF weights' to gmf_sink(grad) and the embedding rows' to field_sink(i,
// touched, G, threads). Returns the loss (with L2 terms). With `skipped`, a NaN or infinite data loss sets
// *skipped and returns before any gradient reaches a sink.
template <class FieldSink, class GmfSink>
double batch_backward(const KernelSet& ks, const FieldModel& m, index_t n, float alpha, FieldWorkspace& ws,
                      GradientSink& mlp_sink, FieldSink&& field_sink, GmfSink&& gmf_sink, bool* skipped,
                      int n_threads) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const Input in = mlp_input(m, n, ws);
  index_t dx_cols = 0;  // input columns up to the last embedding field's end: dense blocks need no gradient
  for (const EmbeddingField& f : m.fields)
    if (f.offset >= 0) dx_cols = std::max(dx_cols, f.offset + f.dim);
  Backward pass(ks, m.mlp, in, alpha, static_cast<double>(n), ws.mlp);
  pass.products(
      n_threads,
      [&](index_t r0, index_t r1, int threads) {
        logits_rows(ks, m, n, ws, r0, r1, threads);
        loss_rows(m, ws, r0, r1);
      },
      dx_cols > 0 ? ws.dx.data() : nullptr, m.width, dx_cols);
  const index_t chunks = (n + kGradientChunkRows - 1) / kGradientChunkRows;
  double loss = 0.0;
  for (index_t c = 0; c < chunks; ++c) loss += ws.loss_parts[static_cast<std::size_t>(c)];
  loss /= static_cast<double>(n);
  if (skipped && !std::isfinite(loss)) {
    *skipped = true;
    return loss;
  }
  if (m.gmf.field_u >= 0) {  // the GMF weights' gradient: the chunks' sums in chunk order, plus L2
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
    std::fill(ws.gmf_grad.begin(), ws.gmf_grad.end(), 0.0f);
    for (index_t c = 0; c < chunks; ++c)
      for (index_t j = 0; j < d; ++j) ws.gmf_grad[j] += ws.gmf_parts[static_cast<std::size_t>(c * d + j)];
    double squares = 0.0;
    for (index_t j = 0; j < d; ++j) {
      squares += static_cast<double>(m.gmf.w[j]) * m.gmf.w[j];
      ws.gmf_grad[j] = (ws.gmf_grad[j] + alpha * m.gmf.w[j]) * inv_n;
    }
    loss += 0.5 * alpha * squares / static_cast<double>(n);
  }
  // Embedding rows: G = (sum of weight * upstream gradient + alpha E) / n over the touched rows only.
  const float* D = ws.mlp.deltas.back().data();  // wide fields' upstream gradient
  ws.field_squares.assign(m.fields.size(), 0.0);
  auto field_backward = [&](std::size_t i, int threads) {
    const EmbeddingField& f = m.fields[i];
    FieldWorkspace::FieldBatch& fb = ws.fields[i];
    const CsrView bags{fb.indptr.data(), fb.ids.data(), fb.weights.data(), n, f.vocab};
    group_by_column(bags, fb.touched);
    fb.grad.resize(fb.touched.ids.size() * static_cast<std::size_t>(f.dim));
    // A field feeds the MLP, the GMF term (the caller keeps GMF tables separate, as NeuMF does) or the logit.
    const float* upstream = f.offset >= 0 ? ws.dx.data() + f.offset
                            : f.wide      ? D
                                          : ws.d_gmf[static_cast<int>(i) == m.gmf.field_u ? 0 : 1].data();
    const index_t ld = f.offset >= 0 ? m.width : f.dim;
    const float alpha_f = f.alpha >= 0.0f ? f.alpha : alpha;
    const double squares = touched_rows_gradient(ks, fb.touched, upstream, ld, f.table, f.dim, alpha_f, inv_n,
                                                 fb.grad.data(), fb.row_squares, threads);
    ws.field_squares[i] = 0.5 * alpha_f * squares / static_cast<double>(n);
    field_sink(i, fb.touched, fb.grad.data(), threads);
  };
  // Fields spread over the threads (for_each_field) share one region with the MLP's gradient sums.
  const int threads = field_threads(m, n, n_threads);
  const bool spread = fields_spread(m, threads);
  loss += pass.apply(mlp_sink, n_threads, spread ? static_cast<std::int64_t>(m.fields.size()) : 0,
                     [&](std::int64_t i) { field_backward(static_cast<std::size_t>(i), 1); });
  if (m.gmf.field_u >= 0) gmf_sink(ws.gmf_grad.data());
  for (std::size_t i = 0; !spread && i < m.fields.size(); ++i) field_backward(i, threads);
  for (double term : ws.field_squares) loss += term;
  return loss;
}

// Copies example rows order[0:n] (keys, y, weight) into the workspace.
void gather_examples(const Examples& ex, const std::int64_t* order, index_t n, FieldWorkspace& ws) {
  for (std::size_t k = 0; k < ws.keys.size(); ++k) {
    ws.keys[k].resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) ws.keys[k][r] = ex.keys[k][order ? order[r] : r];
  }
  ws.y.resize(static_cast<std::size_t>(n));
  for (index_t r = 0; r < n; ++r) ws.y[r] = ex.y ? ex.y[order ? order[r] : r] : 0.0f;
  ws.weight.clear();
  if (ex.weight) {
    ws.weight.resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) ws.weight[r] = ex.weight[order ? order[r] : r];
  }
}

// Appends sampler.negatives rows per positive row [0, n_pos) of the workspace; returns the new row count.
index_t append_negatives(const NegativeSampler& s, index_t n_pos, std::uint64_t stream, FieldWorkspace& ws) {
  if (s.negatives <= 0) return n_pos;
  const index_t n = n_pos * (1 + s.negatives);
  for (auto& keys : ws.keys) keys.resize(static_cast<std::size_t>(n));
  ws.y.resize(static_cast<std::size_t>(n), 0.0f);
  if (!ws.weight.empty()) ws.weight.resize(static_cast<std::size_t>(n), 1.0f);
  std::uint64_t rng = stream;
  std::vector<std::int32_t>& items = ws.keys[static_cast<std::size_t>(s.item_key)];
  const std::vector<std::int32_t>& users = ws.keys[static_cast<std::size_t>(s.user_key)];
  index_t r = n_pos;
  for (index_t p = 0; p < n_pos; ++p) {
    const std::int32_t u = users[p];
    for (int j = 0; j < s.negatives; ++j, ++r) {
      for (std::size_t k = 0; k < ws.keys.size(); ++k) ws.keys[k][r] = ws.keys[k][p];
      const std::int32_t item = draw_negative(s, u, rng);
      items[r] = item;
      ws.y[r] = 0.0f;
    }
  }
  return n;
}

}  // namespace

std::int32_t draw_negative(const NegativeSampler& s, std::int32_t user, std::uint64_t& rng) {
  std::int32_t item = 0;
  for (int attempt = 0; attempt < 64; ++attempt) {
    const double x = uniform01(rng);
    if (s.cdf) {
      item = static_cast<std::int32_t>(std::upper_bound(s.cdf, s.cdf + s.n_items, x * s.cdf[s.n_items - 1]) - s.cdf);
      item = std::min<std::int32_t>(item, static_cast<std::int32_t>(s.n_items - 1));
    } else {
      item = static_cast<std::int32_t>(std::min<index_t>(static_cast<index_t>(x * s.n_items), s.n_items - 1));
    }
    if (!s.seen_indptr ||
        !contains_sorted(s.seen_items + s.seen_indptr[user], s.seen_items + s.seen_indptr[user + 1], item))
      break;
  }
  return item;
}

void mark_touched(EmbeddingField& f, const TouchedRows& touched) {
  if (!f.touched) return;
  for (const auto id : touched.ids) f.touched[id] = 1;
}

UpdateRule embedding_rule(const UpdateRule& dense_rule) {
  UpdateRule r = dense_rule;
  if (dense_rule.kind == UpdateKind::Sgd) r.kind = UpdateKind::PlainSgd;
  if (dense_rule.kind == UpdateKind::Adagrad) r.kind = UpdateKind::RowAdagrad;
  return r;  // Adam: lazy Adam on the touched rows, same bias-corrected rate
}

BagTable::Shape shape_of(const BagTable& bags) {
  bool identity = true;
  for (index_t q = 0; q < bags.rows; ++q) {
    if (bags.indptr[q + 1] != q + 1 || bags.weights[q] != 1.0f) return BagTable::Shape::Any;
    identity = identity && bags.ids[q] == q;
  }
  return identity ? BagTable::Shape::Identity : BagTable::Shape::OneId;
}

void validate(const FieldModel& m) {
  require(!m.mlp.layers.empty() && (m.tower || m.mlp.layers.back().fan_out == 1), "the MLP must end in one output");
  require(!m.tower || (m.n_keys == 1 && m.gmf.field_u < 0 && m.mlp.out == Activation::Identity),
          "a tower has one key column, no GMF term and an identity output layer");
  require(m.mlp.layers[0].fan_in == m.width,
          "coefs[0] has " + std::to_string(m.mlp.layers[0].fan_in) + " rows but the fields and dense blocks give " +
              std::to_string(m.width) + " input columns");
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    const EmbeddingField& f = m.fields[i];
    const std::string name = "field " + std::to_string(i);
    require(f.key >= 0 && f.key < m.n_keys, name + ": key column out of range");
    require(f.offset < 0 || f.offset + f.dim <= m.width, name + ": columns beyond the MLP input width");
    require(f.offset >= 0 || f.wide || static_cast<int>(i) == m.gmf.field_u || static_cast<int>(i) == m.gmf.field_v,
            name + ": offset -1 (no MLP input) is only for the two fields of the GMF term and wide fields");
    require(!m.tower || (!f.wide && f.offset >= 0), name + ": every field of a tower feeds its MLP");
    require(!f.wide || (f.dim == 1 && f.offset < 0 && static_cast<int>(i) != m.gmf.field_u &&
                        static_cast<int>(i) != m.gmf.field_v),
            name + ": a wide field has dim 1, offset -1 and is not a GMF field");
    const index_t nnz = f.bags.indptr[f.bags.rows];
    require(f.bags.indptr[0] == 0, name + ": bag indptr must start at 0");
    // Messages are built only on failure: these loops run over every bag and id.
    for (index_t q = 0; q < f.bags.rows; ++q)
      if (f.bags.indptr[q + 1] < f.bags.indptr[q]) require(false, name + ": bag indptr must be non-decreasing");
    for (index_t p = 0; p < nnz; ++p)
      if (f.bags.ids[p] < 0 || f.bags.ids[p] >= f.vocab)
        require(false, name + ": bag ids must lie in [0, " + std::to_string(f.vocab) + ")");
  }
  for (std::size_t b = 0; b < m.dense.size(); ++b) {
    const DenseBlock& d = m.dense[b];
    require(d.key >= 0 && d.key < m.n_keys, "dense block " + std::to_string(b) + ": key column out of range");
    require(d.offset >= 0 && d.offset + d.cols <= m.width,
            "dense block " + std::to_string(b) + ": columns beyond the MLP input width");
  }
  // The MLP input columns of fields and dense blocks must not overlap: each block is written on its own
  // (fields from different threads), so a shared column would have no defined value.
  std::vector<std::pair<index_t, index_t>> columns;  // [begin, end) of every block, fields first
  for (const EmbeddingField& f : m.fields)
    if (f.offset >= 0) columns.emplace_back(f.offset, f.offset + f.dim);
  for (const DenseBlock& d : m.dense) columns.emplace_back(d.offset, d.offset + d.cols);
  for (std::size_t a = 0; a < columns.size(); ++a)
    for (std::size_t b = a + 1; b < columns.size(); ++b)
      if (columns[a].first < columns[b].second && columns[b].first < columns[a].second)
        require(false, "MLP input columns [" + std::to_string(columns[a].first) + ", " +
                           std::to_string(columns[a].second) + ") and [" + std::to_string(columns[b].first) + ", " +
                           std::to_string(columns[b].second) + ") overlap: each field and dense block needs its own");
  if (m.gmf.field_u >= 0) {
    require(m.gmf.field_v >= 0 && static_cast<std::size_t>(std::max(m.gmf.field_u, m.gmf.field_v)) < m.fields.size(),
            "gmf fields out of range");
    require(m.gmf.field_u != m.gmf.field_v, "the two GMF fields must be different fields");
    require(m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim == m.fields[static_cast<std::size_t>(m.gmf.field_v)].dim,
            "the two GMF fields must have the same dimension");
    require(m.fields[static_cast<std::size_t>(m.gmf.field_u)].offset < 0 &&
                m.fields[static_cast<std::size_t>(m.gmf.field_v)].offset < 0,
            "GMF fields must not also feed the MLP (use separate tables, as NeuMF does)");
  }
}

void validate(const FieldModel& m, const Examples& ex) {
  require(static_cast<int>(ex.keys.size()) == m.n_keys,
          "expected " + std::to_string(m.n_keys) + " key columns, got " + std::to_string(ex.keys.size()));
  for (int k = 0; k < m.n_keys; ++k) {
    index_t rows = -1;  // every table read through key k must have a row for each key value
    for (const EmbeddingField& f : m.fields)
      if (f.key == k) rows = rows < 0 ? f.bags.rows : std::min(rows, f.bags.rows);
    for (const DenseBlock& d : m.dense)
      if (d.key == k) rows = rows < 0 ? d.rows : std::min(rows, d.rows);
    if (rows < 0) continue;
    const std::int32_t* keys = ex.keys[static_cast<std::size_t>(k)];
    for (index_t r = 0; r < ex.rows; ++r)
      if (keys[r] < 0 || keys[r] >= rows)  // the message is built only on failure: this runs per example
        require(false, "key column " + std::to_string(k) + " must hold values in [0, " + std::to_string(rows) + ")");
  }
}

void require_key_rows(const FieldModel& m, int key, index_t min_rows, const std::string& what) {
  for (const EmbeddingField& f : m.fields)
    require(f.key != key || f.bags.rows >= min_rows,
            "a field read through key column " + std::to_string(key) + " has " + std::to_string(f.bags.rows) +
                " rows, fewer than " + what + " (" + std::to_string(min_rows) + ")");
  for (const DenseBlock& d : m.dense)
    require(d.key != key || d.rows >= min_rows,
            "a dense block read through key column " + std::to_string(key) + " has " + std::to_string(d.rows) +
                " rows, fewer than " + what + " (" + std::to_string(min_rows) + ")");
}

void validate(const FieldModel& m, const NegativeSampler& s) {
  require(s.user_key >= 0 && s.user_key < m.n_keys && s.item_key >= 0 && s.item_key < m.n_keys &&
              s.user_key != s.item_key,
          "the sampler's user_key and item_key must be two different key columns of the model");
  require_key_rows(m, s.item_key, s.n_items, "n_items");
}

void field_predict(const KernelSet& ks, const FieldModel& m, const Examples& ex, float* out, int n_threads,
                   SharedThreadChoice* choice) {
  static SharedThreadChoice shared;
  if (!choice) choice = &shared;
  FieldWorkspace ws(m, std::min(ex.rows, kPredictChunk), false);
  std::vector<std::int64_t> order;
  for (index_t r0 = 0; r0 < ex.rows; r0 += kPredictChunk) {
    const index_t n = std::min(kPredictChunk, ex.rows - r0);
    order.resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) order[r] = r0 + r;
    gather_examples(ex, order.data(), n, ws);
    const SharedThreadChoice::Batch batch(*choice, n_threads, n, kMinChosenRows);  // each chunk a batch
    batch_bags(m, n, ws, batch.threads());
    batch_logits(ks, m, n, ws, batch.threads());
    for (index_t r = 0; r < n; ++r) out[r0 + r] = m.bce() ? stable_sigmoid(ws.logits[r]) : ws.logits[r];
  }
}

double field_loss_and_gradients(const KernelSet& ks, const FieldModel& m, const Examples& ex, float alpha,
                                const std::vector<float*>& table_grads, float* gmf_grad,
                                const std::vector<float*>& coef_grads, const std::vector<float*>& intercept_grads,
                                int n_threads) {
  FieldWorkspace ws(m, ex.rows, true);
  gather_examples(ex, nullptr, ex.rows, ws);
  batch_bags(m, ex.rows, ws, n_threads);
  CopySink mlp_sink(m.mlp, coef_grads, intercept_grads);
  return batch_backward(
      ks, m, ex.rows, alpha, ws, mlp_sink,
      [&](std::size_t i, const TouchedRows& touched, const float* G, int) {
        const index_t d = m.fields[i].dim;
        std::memset(table_grads[i], 0, sizeof(float) * static_cast<std::size_t>(m.fields[i].vocab * d));
        for (std::size_t g = 0; g < touched.ids.size(); ++g)
          std::memcpy(table_grads[i] + static_cast<index_t>(touched.ids[g]) * d, G + g * d,
                      sizeof(float) * static_cast<std::size_t>(d));
      },
      [&](const float* g) {
        std::memcpy(gmf_grad, g, sizeof(float) * ws.gmf_grad.size());
      },
      nullptr, n_threads);
}

EpochResult field_train_epoch(const KernelSet& ks, FieldModel& m, Optimizer& opt, const Examples& ex,
                              const std::int64_t* order, index_t n_order, index_t batch_size, float alpha,
                              const NegativeSampler& sampler, std::uint64_t epoch, const StopCheck& stop,
                              int n_threads) {
  FieldWorkspace ws(m, std::min(batch_size, n_order) * (1 + std::max(sampler.negatives, 0)), true);
  EpochResult result;
  BatchThreads batch_threads(n_threads);
  std::uint64_t batch_index = 0;
  for (index_t begin = 0; begin < n_order; begin += batch_size, ++batch_index) {
    if (stop && stop(begin)) break;
    const int threads = batch_threads.next();
    const index_t n_pos = std::min(batch_size, n_order - begin);
    gather_examples(ex, order + begin, n_pos, ws);
    // One random stream per (seed, epoch, batch): the same negatives whatever n_threads.
    std::uint64_t stream = sampler.seed ^ (epoch * 0x9e3779b97f4a7c15ULL);
    stream = splitmix64(stream) ^ batch_index;
    const index_t n = append_negatives(sampler, n_pos, splitmix64(stream), ws);
    const std::uint64_t dropout_stream = splitmix64(stream);
    batch_bags(m, n, ws, threads, &dropout_stream);
    const std::int64_t step_before = opt.adam_t;
    bool skipped = false;
    const UpdateRule rule = opt.next_step();
    const UpdateRule row_rule = embedding_rule(rule);
    UpdateSink mlp_sink(ks, m.mlp, opt, rule);
    const double loss = batch_backward(
        ks, m, n, alpha, ws, mlp_sink,
        [&](std::size_t i, const TouchedRows& touched, const float* G, int field_threads) {
          EmbeddingField& f = m.fields[i];
          update_touched_rows(ks, row_rule, touched, f.table, f.dim, G, f.state1, f.state2, field_threads);
          mark_touched(f, touched);
        },
        [&](const float* g) {
          const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
          update_dense(ks, rule, m.gmf.w, g, m.gmf.state1, m.gmf.state2, d, 1);
        },
        &skipped, threads);
    if (!end_batch(result, opt, step_before, skipped, loss, n)) break;
    batch_threads.done(n);
  }
  return result;
}

namespace {

// x rows (n x width) with only the inputs read through key column `side` (all other columns zero), and the
// pooled vector of the GMF field of that side (if any) into ws.pooled_gmf[0].
void side_inputs(const KernelSet& ks, const FieldModel& m, index_t n, int side, FieldWorkspace& ws, int n_threads) {
  std::fill(ws.x.begin(), ws.x.begin() + n * m.width, 0.0f);
  std::fill(ws.logits.begin(), ws.logits.begin() + n, 0.0f);  // the side's wide terms
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    const EmbeddingField& f = m.fields[i];
    if (f.key != side) continue;
    const CsrView bags = gather_bags(f, ws.keys[static_cast<std::size_t>(f.key)], n, ws.fields[i], nullptr);
    if (f.offset >= 0) {
      csr_matmul(ks, bags, f.table, f.dim, f.dim, ws.x.data() + f.offset, m.width, nullptr, n_threads);
    } else if (f.wide) {
      csr_matmul(ks, bags, f.table, 1, 1, ws.wide.data(), 1, nullptr, n_threads);
      for (index_t r = 0; r < n; ++r) ws.logits[r] += ws.wide[r];
    } else {
      csr_matmul(ks, bags, f.table, f.dim, f.dim, ws.pooled_gmf[0].data(), f.dim, nullptr, n_threads);
    }
  }
  for (const DenseBlock& b : m.dense) {
    if (b.key != side) continue;
    const std::vector<std::int32_t>& keys = ws.keys[static_cast<std::size_t>(b.key)];
    constexpr index_t kAhead = 8;  // rows of a table that may not fit the cache: prefetch the next ones
    for (index_t r = 0; r < n; ++r) {
      if (r + kAhead < n) __builtin_prefetch(b.table + static_cast<index_t>(keys[r + kAhead]) * b.cols);
      std::memcpy(ws.x.data() + r * m.width + b.offset, b.table + static_cast<index_t>(keys[r]) * b.cols,
                  sizeof(float) * static_cast<std::size_t>(b.cols));
    }
  }
}

void build_topk_cache(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s, TopkCache& cache,
                      int n_threads) {
  const Layer& first = m.mlp.layers[0];
  const index_t h = first.fan_out, n_items = s.n_items;
  const index_t d = m.gmf.field_u >= 0 ? m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim : 0;
  cache.bf16_items = -1;  // the approximate top-k's bf16 copy follows item_part
  cache.item_part.assign_zeros(static_cast<std::size_t>(n_items * h));
  cache.item_gmf.resize(static_cast<std::size_t>(n_items * d));
  cache.item_wide.resize(static_cast<std::size_t>(n_items));
  // The product runs over the item side's input columns only: the user side's are zero here, and leaving
  // out exact zeros changes no sum. Column ranges (first column, count) in column order, and W's rows for them.
  std::vector<std::pair<index_t, index_t>> ranges;
  for (const EmbeddingField& f : m.fields)
    if (f.key == s.item_key && f.offset >= 0) ranges.emplace_back(f.offset, f.dim);
  for (const DenseBlock& b : m.dense)
    if (b.key == s.item_key) ranges.emplace_back(b.offset, b.cols);
  std::sort(ranges.begin(), ranges.end());
  index_t k = 0;
  for (const auto& range : ranges) k += range.second;
  std::vector<float> w_item(static_cast<std::size_t>(k * h));
  index_t pos = 0;
  for (const auto& [col, cols] : ranges) {
    std::memcpy(w_item.data() + pos * h, first.W + col * h, sizeof(float) * static_cast<std::size_t>(cols * h));
    pos += cols;
  }
  const index_t chunk = std::min(n_items, kPredictChunk);
  std::vector<float> x_item(static_cast<std::size_t>(chunk * k));
  FieldWorkspace ws(m, chunk, false);
  for (index_t c0 = 0; c0 < n_items; c0 += kPredictChunk) {
    const index_t n = std::min(kPredictChunk, n_items - c0);
    for (auto& keys : ws.keys) keys.assign(static_cast<std::size_t>(n), 0);
    for (index_t r = 0; r < n; ++r) ws.keys[static_cast<std::size_t>(s.item_key)][r] = static_cast<std::int32_t>(c0 + r);
    side_inputs(ks, m, n, s.item_key, ws, n_threads);
    for (index_t r = 0; r < n; ++r) {
      float* row = x_item.data() + r * k;
      for (const auto& [col, cols] : ranges) {
        std::memcpy(row, ws.x.data() + r * m.width + col, sizeof(float) * static_cast<std::size_t>(cols));
        row += cols;
      }
    }
    sgemm(ks, false, false, n, h, k, x_item.data(), k, w_item.data(), h, cache.item_part.data() + c0 * h, h, nullptr,
          n_threads);
    if (d) std::memcpy(cache.item_gmf.data() + c0 * d, ws.pooled_gmf[0].data(), sizeof(float) * static_cast<std::size_t>(n * d));
    std::memcpy(cache.item_wide.data() + c0, ws.logits.data(), sizeof(float) * static_cast<std::size_t>(n));
  }
  cache.n_items = n_items;
}

}  // namespace

namespace {

using Scored = std::pair<float, std::int32_t>;  // (score, item)

// Higher score first, then the lower item: a total order, so the top k are the same however items are split.
bool better(const Scored& a, const Scored& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); }

// Keeps the k best of what is pushed (worst on top of the heap).
void push_top(std::vector<Scored>& heap, index_t k, const Scored& entry) {
  if (static_cast<index_t>(heap.size()) < k) {
    heap.push_back(entry);
    std::push_heap(heap.begin(), heap.end(), better);
  } else if (better(entry, heap.front())) {
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = entry;
    std::push_heap(heap.begin(), heap.end(), better);
  }
}

// What top-k needs of one user: the user's part of the first layer (bias included), its GMF vector times w,
// its wide terms and its seen items.
struct UserSide {
  std::vector<float> part, gmf;
  float wide = 0.0f;
  const std::int32_t *seen_begin = nullptr, *seen_end = nullptr;
};

void user_side(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s, std::int32_t user,
               bool exclude_seen, FieldWorkspace& ws, UserSide& out) {
  const Layer& first = m.mlp.layers[0];
  const index_t d = m.gmf.field_u >= 0 ? m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim : 0;
  for (auto& keys : ws.keys) keys.assign(1, 0);
  ws.keys[static_cast<std::size_t>(s.user_key)][0] = user;
  side_inputs(ks, m, 1, s.user_key, ws, 1);
  Epilogue bias;
  bias.bias = first.b;
  out.part.resize(static_cast<std::size_t>(first.fan_out));
  sgemm(ks, false, false, 1, first.fan_out, m.width, ws.x.data(), m.width, first.W, first.fan_out, out.part.data(),
        first.fan_out, &bias, 1);
  out.gmf.resize(static_cast<std::size_t>(d));
  for (index_t j = 0; j < d; ++j) out.gmf[j] = m.gmf.w[j] * ws.pooled_gmf[0][j];
  out.wide = ws.logits[0];
  const bool skip = exclude_seen && s.seen_indptr;
  out.seen_begin = skip ? s.seen_items + s.seen_indptr[user] : nullptr;
  out.seen_end = skip ? s.seen_items + s.seen_indptr[user + 1] : nullptr;
}

// Layers 1.. of the MLP with every weight matrix packed once per top-k call into the micro-kernel's
// NR-column panels (fan_in x NR each, zero-padded): every panel of items multiplies the same weights, so
// packing them per product (as sgemm does) would be repeated millions of times.
// A last layer of one output is a dot product per row instead (the micro-kernel would fill 1 of its NR
// columns): layers [1, tiled) run on the micro-kernel.
struct PackedTail {
  std::vector<AlignedBuffer> w;  // w[l - 1]: layer l's panels, ceil(fan_out / NR) of them, one after another
  bool dot_last;
  std::size_t tiled;
  index_t panels_per_rows = 0;  // weight panels of the tiled layers: micro-kernel calls per MR items

  PackedTail(const KernelSet& ks, const Network& net) : w(net.layers.size() - 1) {
    const std::size_t L = net.layers.size();
    dot_last = L > 1 && net.layers[L - 1].fan_out == 1;
    tiled = dot_last ? L - 1 : L;
    for (std::size_t l = 1; l < tiled; ++l) {
      const Layer& layer = net.layers[l];
      const index_t panels = (layer.fan_out + ks.nr - 1) / ks.nr;
      panels_per_rows += panels;
      float* packed = w[l - 1].get(static_cast<std::size_t>(panels * layer.fan_in * ks.nr));
      for (index_t j = 0; j < layer.fan_out; j += ks.nr)
        ks.pack_b(true, layer.W + j, layer.fan_out, static_cast<int>(std::min<index_t>(ks.nr, layer.fan_out - j)),
                  layer.fan_in, packed + j * layer.fan_in);
    }
  }
};

// Row stride of the per-panel activation buffers: the width plus 16 floats, so the MR rows a micro-kernel
// reads in place do not share L1 sets at a power-of-two stride.
index_t padded(index_t width) { return (width + 15) / 16 * 16 + 16; }

// Items top-k scores together: kBlockPanels micro-panels of MR items. Each packed weight panel (up to 32 KiB)
// is then read from L2 once per block and reused from L1 by every micro-panel, while the block's
// activations (about 100 KiB for 96 items and 256 units) stay in L2.
constexpr index_t kBlockPanels = 8;
// Blocks ahead whose cached rows are prefetched while a block is scored: two, so that even the rows
// prefetched last have a whole block's time (tens of microseconds) to arrive.
constexpr index_t kAheadBlocks = 2;
// Blocks per parallel work unit: enough that the first blocks of a unit, whose cached rows were not
// prefetched, do not matter.
constexpr index_t kBlocksPerChunk = 64;

// One thread's activations for a block: acts[l] is the input of layer l (rows x padded(fan_in)), acts[L]
// the logits.
struct TailWorkspace {
  std::vector<AlignedBuffer> acts;
  std::vector<const void*> prefetch;  // the cached rows of the next block's items
  TailWorkspace(const KernelSet& ks, const Network& net) : acts(net.layers.size() + 1) {
    for (std::size_t l = 1; l <= net.layers.size(); ++l) {
      // Zeroed: a partial micro-panel's rows past the block's items are read (never stored) by the kernel.
      const auto size = static_cast<std::size_t>(kBlockPanels * ks.mr * padded(net.layers[l - 1].fan_out));
      std::fill_n(acts[l].get(size), size, 0.0f);
    }
  }
};

// Scores n <= kBlockPanels * MR items for one user on the calling thread. While the products run, the
// cached rows of the `next` items (a later block's) are prefetched into L2: the 1 GB cache of a million items then streams
// from memory behind the arithmetic instead of before it.
void score_block(const KernelSet& ks, const FieldModel& m, const TopkCache& cache, const PackedTail& tail,
                 const UserSide& user, const std::int32_t* items, index_t n, const std::int32_t* next, index_t n_next,
                 TailWorkspace& ws, float* scores) {
  const std::size_t L = m.mlp.layers.size();
  const index_t h = m.mlp.layers[0].fan_out;
  // The first layer: act(item part + user part), or the logit itself for an MLP of one layer.
  float* z1 = ws.acts[1].data();
  const index_t ld1 = padded(h);
  Epilogue first;  // scale 0: z1 = act(item part + user part), one pass per row in the kernels' SIMD width
  first.scale = 0.0f;
  first.addend_scale = 1.0f;
  first.bias = user.part.data();
  first.act = L > 1 ? m.mlp.hidden : Activation::Identity;
  for (index_t r = 0; r < n; ++r) {
    first.addend = cache.item_part.data() + static_cast<index_t>(items[r]) * h;
    ks.epilogue(z1 + r * ld1, ld1, 1, static_cast<int>(h), 0, 0, first);
  }
  // The next rows, shared out over the micro-kernel calls, which spread their cache lines over their FMAs
  // (a burst would stall on the L1 fill buffers).
  const int lines_per_row = static_cast<int>((h * static_cast<index_t>(sizeof(float)) + 63) / 64);
  ws.prefetch.resize(static_cast<std::size_t>(n_next));
  for (index_t r = 0; r < n_next; ++r)
    ws.prefetch[static_cast<std::size_t>(r)] = cache.item_part.data() + static_cast<index_t>(next[r]) * h;
  const index_t calls = (n + ks.mr - 1) / ks.mr * tail.panels_per_rows;
  const index_t n_rows = static_cast<index_t>(ws.prefetch.size());
  const index_t per_call = calls ? (n_rows + calls - 1) / calls : 0;
  index_t prefetched = 0;
  for (std::size_t l = 1; l < tail.tiled; ++l) {
    const Layer& layer = m.mlp.layers[l];
    const index_t ld_in = padded(layer.fan_in), ld_out = padded(layer.fan_out);
    TileExtra extra;
    extra.act = l + 1 == L ? Activation::Identity : m.mlp.hidden;
    for (index_t j = 0; j < layer.fan_out; j += ks.nr) {  // one weight panel, reused from L1 by every micro-panel
      const int cols = static_cast<int>(std::min<index_t>(ks.nr, layer.fan_out - j));
      const float* w = tail.w[l - 1].data() + j * layer.fan_in;
      extra.bias = layer.b + j;
      for (index_t r = 0; r < n; r += ks.mr) {
        extra.prefetch = ws.prefetch.data() + prefetched;
        extra.n_prefetch = static_cast<int>(std::min(per_call, n_rows - prefetched));
        extra.prefetch_lines = lines_per_row;
        prefetched += extra.n_prefetch;
        ks.ukernel(layer.fan_in, ws.acts[l].data() + r * ld_in, ld_in, 1, w, ks.nr, ws.acts[l + 1].data() + r * ld_out + j,
                   ld_out, false, static_cast<int>(std::min<index_t>(ks.mr, n - r)), cols, &extra);
      }
    }
  }
  for (; prefetched < n_rows; ++prefetched)
    for (int c = 0; c < lines_per_row; ++c)
      __builtin_prefetch(static_cast<const char*>(ws.prefetch[static_cast<std::size_t>(prefetched)]) + 64 * c, 0, 2);
  if (tail.dot_last) {
    const Layer& last = m.mlp.layers[L - 1];
    ks.dot_rows(ws.acts[L - 1].data(), padded(last.fan_in), n, last.W, last.fan_in, last.b[0], scores);
    return;
  }
  const float* logits = ws.acts[L].data();
  const index_t ld_logits = padded(m.mlp.layers[L - 1].fan_out);
  for (index_t r = 0; r < n; ++r) scores[r] = logits[r * ld_logits];
}

// Scores candidate positions [c0, c0 + n) for one user on the calling thread, block by block, and pushes
// them into heap.
void score_range(const KernelSet& ks, const FieldModel& m, const TopkCache& cache, const PackedTail& tail,
                 const UserSide& user, const std::int32_t* candidates, index_t c0, index_t n, index_t k,
                 TailWorkspace& ws, std::vector<Scored>& heap) {
  const index_t block = kBlockPanels * ks.mr;
  const index_t blocks = (n + block - 1) / block;
  const index_t d = static_cast<index_t>(user.gmf.size());
  // The items of the block being scored and of the kAheadBlocks after it, whose rows are being prefetched.
  std::vector<std::int32_t> items(static_cast<std::size_t>((kAheadBlocks + 1) * block));
  std::vector<float> scores(static_cast<std::size_t>(block));
  auto slot = [&](index_t b) { return items.data() + (b % (kAheadBlocks + 1)) * block; };
  auto rows_of = [&](index_t b) { return b < blocks ? std::min(block, n - b * block) : index_t{0}; };
  auto fill = [&](index_t b) {
    for (index_t r = 0; r < rows_of(b); ++r) {
      const index_t pos = c0 + b * block + r;
      slot(b)[r] = candidates ? candidates[pos] : static_cast<std::int32_t>(pos);
    }
  };
  for (index_t b = 0; b < kAheadBlocks; ++b) fill(b);
  for (index_t b = 0; b < blocks; ++b) {
    fill(b + kAheadBlocks);
    const index_t rows = rows_of(b);
    const std::int32_t* cur = slot(b);
    score_block(ks, m, cache, tail, user, cur, rows, slot(b + kAheadBlocks), rows_of(b + kAheadBlocks), ws,
                scores.data());
    for (index_t r = 0; r < rows; ++r) {
      const std::int32_t item = cur[r];
      if (user.seen_begin && contains_sorted(user.seen_begin, user.seen_end, item)) continue;
      float score = scores[static_cast<std::size_t>(r)] + user.wide + cache.item_wide[static_cast<std::size_t>(item)];
      const float* g = cache.item_gmf.data() + static_cast<index_t>(item) * d;
      for (index_t j = 0; j < d; ++j) score += user.gmf[static_cast<std::size_t>(j)] * g[j];
      push_top(heap, k, Scored{score, item});
    }
  }
}

void write_top(const FieldModel& m, std::vector<Scored>& heap, index_t k, std::int32_t* items, float* scores) {
  std::sort_heap(heap.begin(), heap.end(), better);
  for (index_t j = 0; j < k; ++j) {
    const bool has = j < static_cast<index_t>(heap.size());
    items[j] = has ? heap[j].second : -1;
    scores[j] = has ? (m.bce() ? stable_sigmoid(heap[j].first) : heap[j].first) : -std::numeric_limits<float>::infinity();
  }
}

// ---- Approximate top-k (field_topk's approx_fraction; docs/DESIGN.md, "Approximate top-k") ----

constexpr index_t kProxySample = 4096;  // candidates per user scored exactly to fit the surrogate on
// The sample's splitmix64 stream: the same positions for every user and call (reference.splitmix64_outputs).
constexpr std::uint64_t kProxySeed = 0x7f4a7c15b5ad4eceULL;
// Ridge weight relative to the mean variance of the features: dead units (constant 0 under ReLU) and units
// that move together make the plain normal equations singular; this keeps them solvable and barely moves
// the fit of the others.
constexpr double kProxyRidge = 1e-4;
constexpr index_t kProxyChunk = 1 << 14;  // candidates per parallel unit of the proxy pass

// The bf16 copy of item_part (TopkCache::item_part_bf16).
void build_bf16_cache(const FieldModel& m, TopkCache& cache, int n_threads) {
  const index_t h = m.mlp.layers[0].fan_out, ld = (h + 31) / 32 * 32, n = cache.n_items;
  cache.item_part_bf16.assign_zeros(static_cast<std::size_t>(n * ld / 2));
  auto* out = reinterpret_cast<std::uint16_t*>(cache.item_part_bf16.data());
  const float* in = cache.item_part.data();
  parallel_for(0, (n + kProxyChunk - 1) / kProxyChunk, n_threads, [&](std::int64_t c) {
    for (index_t i = c * kProxyChunk; i < std::min(n, (c + 1) * kProxyChunk); ++i)
      for (index_t j = 0; j < h; ++j) out[i * ld + j] = static_cast<std::uint16_t>(bf16_round_bits(in[i * h + j]) >> 16);
  });
  cache.bf16_ld = ld;
  cache.bf16_items = n;
}

// What an item's exact score adds to the MLP's output: the wide terms and the GMF term. Summed before being added
// to the MLP's output, so mlp + side_terms can differ from score_range's score by rounding: it only ranks the
// surrogate's sample (fit_surrogate), never a returned score.
float side_terms(const TopkCache& cache, const UserSide& user, std::int32_t item) {
  const index_t d = static_cast<index_t>(user.gmf.size());
  float score = user.wide + cache.item_wide[static_cast<std::size_t>(item)];
  const float* g = cache.item_gmf.data() + static_cast<index_t>(item) * d;
  for (index_t j = 0; j < d; ++j) score += user.gmf[static_cast<std::size_t>(j)] * g[j];
  return score;
}

// The proxy of one user: score = bias + sum_j a[j] act(bf16 item part[j] + u[j]) + GMF + item wide.
struct Surrogate {
  // The user's first-layer part and the weights: bf16_ld entries (zero past fan_out) in ActDotsFn's pair-split order.
  std::vector<float> u, a;
  float bias = 0.0f;        // the intercept plus the user's wide term
};

// The sample: positions of a list of n candidates drawn from the splitmix64 stream, ascending, each once (all
// positions when n <= kProxySample).
std::vector<index_t> sample_positions(index_t n) {
  std::vector<index_t> pos;
  if (n <= kProxySample) {
    for (index_t p = 0; p < n; ++p) pos.push_back(p);
    return pos;
  }
  std::uint64_t state = kProxySeed;
  for (index_t j = 0; j < kProxySample; ++j)
    pos.push_back(static_cast<index_t>(splitmix64(state) % static_cast<std::uint64_t>(n)));
  std::sort(pos.begin(), pos.end());
  pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
  return pos;
}

// Solves (A) x = b in place for a symmetric positive definite A (n x n, row-major; overwritten by its Cholesky
// factor), b becoming x. Each inner sum in four partial sums added in a fixed order.
void cholesky_solve(std::vector<double>& A, std::vector<double>& b, index_t n) {
  auto dot = [](const double* x, const double* y, index_t len) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    index_t i = 0;
    for (; i + 4 <= len; i += 4)
      for (int l = 0; l < 4; ++l) s[l] += x[i + l] * y[i + l];
    for (; i < len; ++i) s[0] += x[i] * y[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
  };
  for (index_t j = 0; j < n; ++j) {
    double* lj = A.data() + j * n;
    const double diag = std::sqrt(std::max(lj[j] - dot(lj, lj, j), std::numeric_limits<double>::min()));
    lj[j] = diag;
    for (index_t i = j + 1; i < n; ++i) {
      double* li = A.data() + i * n;
      li[j] = (li[j] - dot(li, lj, j)) / diag;
    }
  }
  for (index_t i = 0; i < n; ++i) b[i] = (b[i] - dot(A.data() + i * n, b.data(), i)) / A[i * n + i];
  for (index_t i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (index_t r = i + 1; r < n; ++r) s -= A[r * n + i] * b[r];
    b[i] = s / A[i * n + i];
  }
}

// Fits the user's surrogate: the sample of list[0:n] (list == nullptr: positions are items) scored exactly,
// then least squares of the MLP's output on the features act(bf16 item part + user part) over the sample's
// best quarter by exact score (the items near the top, where the ranking is decided), centred, with the
// ridge above.
void fit_surrogate(const KernelSet& ks, const FieldModel& m, const TopkCache& cache, const PackedTail& tail,
                   const UserSide& user, const std::int32_t* list, index_t n, int threads, TailWorkspace* ws,
                   Surrogate& sur, std::vector<std::int32_t>* sample_out) {
  const index_t h = m.mlp.layers[0].fan_out, ld = cache.bf16_ld;
  const std::vector<index_t> pos = sample_positions(n);
  const auto s = static_cast<index_t>(pos.size());
  std::vector<std::int32_t> items(static_cast<std::size_t>(s));
  for (index_t r = 0; r < s; ++r) items[r] = list ? list[pos[r]] : static_cast<std::int32_t>(pos[r]);
  std::vector<float> mlp(static_cast<std::size_t>(s));
  const index_t block = kBlockPanels * ks.mr;
  parallel_for<true>(0, (s + block - 1) / block, threads, [&](std::int64_t c) {
    const index_t b = c * block;
    TailWorkspace& w = ws[threads <= 1 ? 0 : thread_id()];
    score_block(ks, m, cache, tail, user, items.data() + b, std::min(block, s - b), nullptr, 0, w, mlp.data() + b);
  });
  std::vector<Scored> ranked(static_cast<std::size_t>(s));
  for (index_t r = 0; r < s; ++r)
    ranked[r] = Scored{mlp[r] + side_terms(cache, user, items[r]), static_cast<std::int32_t>(r)};
  const index_t q = std::max<index_t>(1, s / 4);
  std::partial_sort(ranked.begin(), ranked.begin() + q, ranked.end(), better);
  // The features as the proxy pass computes them (the bf16 item part), and the targets.
  const auto* x = reinterpret_cast<const std::uint16_t*>(cache.item_part_bf16.data());
  std::vector<float> F(static_cast<std::size_t>(q * h)), row(static_cast<std::size_t>(h));
  std::vector<double> y(static_cast<std::size_t>(q));
  Epilogue e;
  e.scale = 0.0f;
  e.addend = row.data();
  e.addend_scale = 1.0f;
  e.bias = user.part.data();
  e.act = m.mlp.hidden;
  for (index_t i = 0; i < q; ++i) {
    const index_t r = ranked[static_cast<std::size_t>(i)].second;
    const std::uint16_t* bits = x + static_cast<index_t>(items[r]) * ld;
    for (index_t j = 0; j < h; ++j) {
      const std::uint32_t w = static_cast<std::uint32_t>(bits[j]) << 16;
      std::memcpy(&row[static_cast<std::size_t>(j)], &w, sizeof w);
    }
    ks.epilogue(F.data() + i * h, h, 1, static_cast<int>(h), 0, 0, e);
    y[i] = mlp[r];
  }
  std::vector<double> mean(static_cast<std::size_t>(h), 0.0);
  double y_mean = 0.0;
  for (index_t i = 0; i < q; ++i) {
    for (index_t j = 0; j < h; ++j) mean[j] += F[i * h + j];
    y_mean += y[i];
  }
  for (double& v : mean) v /= static_cast<double>(q);
  y_mean /= static_cast<double>(q);
  std::vector<double> rhs(static_cast<std::size_t>(h), 0.0);
  for (index_t i = 0; i < q; ++i)
    for (index_t j = 0; j < h; ++j) {
      F[i * h + j] = static_cast<float>(F[i * h + j] - mean[j]);
      rhs[j] += static_cast<double>(F[i * h + j]) * (y[i] - y_mean);
    }
  std::vector<float> gram(static_cast<std::size_t>(h * h));
  sgemm(ks, true, false, h, h, q, F.data(), h, F.data(), h, gram.data(), h, nullptr, 1);
  std::vector<double> A(gram.begin(), gram.end());
  double trace = 0.0;
  for (index_t j = 0; j < h; ++j) trace += A[j * h + j];
  const double ridge = kProxyRidge * trace / static_cast<double>(h) + std::numeric_limits<double>::min();
  for (index_t j = 0; j < h; ++j) A[j * h + j] += ridge;
  cholesky_solve(A, rhs, h);
  sur.u.assign(static_cast<std::size_t>(ld), 0.0f);
  sur.a.assign(static_cast<std::size_t>(ld), 0.0f);
  double intercept = y_mean;
  for (index_t j = 0; j < h; ++j) {
    sur.u[j] = user.part[j];
    sur.a[j] = static_cast<float>(rhs[j]);
    intercept -= mean[j] * rhs[j];
  }
  act_dots_split(sur.u.data(), ld);
  act_dots_split(sur.a.data(), ld);
  sur.bias = static_cast<float>(intercept) + user.wide;
  if (sample_out) {
    sample_out->assign(items.begin(), items.end());
    std::sort(sample_out->begin(), sample_out->end());
  }
}

// Proxy scores of list positions [p0, p0 + n) into out (NaN as -inf, so that the order stays total); iota: a
// buffer for the items when list == nullptr.
void proxy_range(const KernelSet& ks, const FieldModel& m, const TopkCache& cache, const Surrogate& sur,
                 const UserSide& user, const std::int32_t* list, index_t p0, index_t n, std::vector<std::int32_t>& iota,
                 float* out) {
  const std::int32_t* items = list ? list + p0 : nullptr;
  if (!list) {
    iota.resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) iota[r] = static_cast<std::int32_t>(p0 + r);
    items = iota.data();
  }
  const auto d = static_cast<index_t>(user.gmf.size());
  ks.act_dots(reinterpret_cast<const std::uint16_t*>(cache.item_part_bf16.data()), cache.bf16_ld, items, n,
           cache.bf16_ld, sur.u.data(), sur.a.data(), d ? cache.item_gmf.data() : nullptr, d, d,
           d ? user.gmf.data() : nullptr, sur.bias, m.mlp.hidden, out);
  for (index_t r = 0; r < n; ++r) {
    const float v = out[r] + cache.item_wide[static_cast<std::size_t>(items[r])];
    out[r] = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
  }
}

// One thread's buffers of the first stage.
struct ApproxBuffers {
  std::vector<float> scores;
  std::vector<Scored> pool;
  std::vector<std::int32_t> kept;
  std::vector<std::vector<std::int32_t>> iota;  // one per thread of a region over chunks
};

// The `keep` best of scores[0:n] by `better` (item list[p], or p when list == nullptr), ascending by item, into
// buf.kept. Only the scores at or above a threshold are sorted out: one from every kSelectStride-th score, at
// 1.5 times the share wanted. When at least `keep` scores reach it, the keep best all do (the keep-th best is
// >= it); otherwise every score is pooled. Either way the same items: `better` is a total order.
constexpr index_t kSelectStride = 16;
void select_best(const float* scores, const std::int32_t* list, index_t n, index_t keep, ApproxBuffers& buf) {
  std::vector<float> sub;
  for (index_t p = 0; p < n; p += kSelectStride) sub.push_back(scores[p]);
  const auto rank = std::min<index_t>(static_cast<index_t>(sub.size()) - 1, keep * 3 / 2 / kSelectStride);
  std::nth_element(sub.begin(), sub.begin() + rank, sub.end(), std::greater<float>());
  const float threshold = sub[static_cast<std::size_t>(rank)];
  auto item = [&](index_t p) { return list ? list[p] : static_cast<std::int32_t>(p); };
  buf.pool.clear();
  for (index_t p = 0; p < n; ++p)
    if (scores[p] >= threshold) buf.pool.push_back(Scored{scores[p], item(p)});
  if (static_cast<index_t>(buf.pool.size()) < keep) {
    buf.pool.clear();
    for (index_t p = 0; p < n; ++p) buf.pool.push_back(Scored{scores[p], item(p)});
  }
  std::nth_element(buf.pool.begin(), buf.pool.begin() + keep, buf.pool.end(), better);
  buf.kept.resize(static_cast<std::size_t>(keep));
  for (index_t r = 0; r < keep; ++r) buf.kept[r] = buf.pool[static_cast<std::size_t>(r)].second;
  std::sort(buf.kept.begin(), buf.kept.end());  // ascending: the exact stage reads the cache in address order
}

// The first stage for one user: the `keep` best candidates of list[0:n] by proxy score, ascending, into
// buf.kept. threads >= 1: 1 on the calling thread (inside a region over users), more over that many threads;
// ws: the calling thread's workspace (threads == 1), else one per thread.
void approx_stage(const KernelSet& ks, const FieldModel& m, const TopkCache& cache, const PackedTail& tail,
                  const UserSide& user, const std::int32_t* list, index_t n, index_t keep, int threads,
                  TailWorkspace* ws, ApproxBuffers& buf) {
  Surrogate sur;
  fit_surrogate(ks, m, cache, tail, user, list, n, threads, ws, sur, nullptr);
  buf.scores.resize(static_cast<std::size_t>(n));
  buf.iota.resize(static_cast<std::size_t>(std::max(threads, 1)));
  parallel_for<true>(0, (n + kProxyChunk - 1) / kProxyChunk, threads, [&](std::int64_t c) {
    const index_t p0 = c * kProxyChunk;
    auto& iota = buf.iota[threads <= 1 ? 0 : static_cast<std::size_t>(thread_id())];
    proxy_range(ks, m, cache, sur, user, list, p0, std::min(kProxyChunk, n - p0), iota, buf.scores.data() + p0);
  });
  select_best(buf.scores.data(), list, n, keep, buf);
}

// Candidates the exact stage scores of a list of n: the fraction (at least k), plus one per seen item of the
// user (which the exact stage skips); n when that leaves nothing out (then the whole list is scored exactly).
index_t approx_keep(double fraction, index_t n, index_t k, const UserSide& user) {
  const double want = std::ceil(fraction * static_cast<double>(n));
  const index_t seen = user.seen_begin ? static_cast<index_t>(user.seen_end - user.seen_begin) : 0;
  if (!(want < static_cast<double>(n))) return n;
  return std::min(n, std::max(k, static_cast<index_t>(want)) + seen);
}

constexpr index_t kMinChosenScores = 1 << 14;  // smaller top-k calls take no part in the thread choice

// Top-k of every user over the item list list_of(u, scratch) gives it: (items, count), items == nullptr
// meaning items 0..count-1; scratch is a buffer the caller may fill (one per thread). max_list bounds every
// count (it sizes the thread team when the users are too few to split over).
template <class ListOf>
void topk_lists(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s, const std::int32_t* users,
                index_t n_users, index_t max_list, const ListOf& list_of, index_t k, bool exclude_seen,
                std::int32_t* out_items, float* out_scores, TopkCache& cache, int n_threads,
                double approx_fraction) {
  // The first layer is linear in x = [user part, item part]: its item part is computed once for all items
  // (cached), its user part once per user, and only the rest of the MLP runs per (user, item). Each thread
  // scores whole chunks of items with its own workspace: one parallel region per call (many users: split
  // over users) or per user (fewer users than threads: split over item chunks, the chunks' best merged).
  // Users and chunks go to whichever thread is free (a thread slowed by another process does fewer); the
  // result does not depend on which thread scored what.
  // The call is one batch of the model's top-k calls, whose thread count is chosen by measurement.
  const SharedThreadChoice::Batch batch(cache.threads, n_threads, n_users * max_list, kMinChosenScores);
  // Approximate: each user's list narrowed by approx_stage first (an MLP of one layer is linear: exact anyway).
  const bool approx = approx_fraction > 0.0 && m.mlp.layers.size() > 1;
  {
    const std::lock_guard<std::mutex> lock(cache.mutex);  // concurrent first calls from Python threads
    if (cache.n_items != s.n_items) build_topk_cache(ks, m, s, cache, batch.threads());
    if (approx && cache.bf16_items != cache.n_items) build_bf16_cache(m, cache, batch.threads());
  }
  const index_t chunk = kBlocksPerChunk * kBlockPanels * ks.mr;
  const index_t max_chunks = (max_list + chunk - 1) / chunk;
  const bool over_users = n_users >= batch.threads();
  // One workspace per thread that will run: no more threads than users, or than chunks.
  const int threads = static_cast<int>(std::max<index_t>(
      1, std::min<index_t>(batch.threads(), over_users ? n_users : max_chunks)));
  const PackedTail tail(ks, m.mlp);
  std::vector<TailWorkspace> tail_ws;
  std::vector<FieldWorkspace> field_ws;
  std::vector<std::vector<std::int32_t>> scratch(static_cast<std::size_t>(threads));
  std::vector<ApproxBuffers> approx_buf(approx ? static_cast<std::size_t>(threads) : 0);
  for (int t = 0; t < threads; ++t) {
    tail_ws.emplace_back(ks, m.mlp);
    field_ws.emplace_back(m, 1, false);
  }
  if (over_users) {
    parallel_for<true>(0, n_users, threads, [&](std::int64_t u) {
      const auto t = static_cast<std::size_t>(thread_id());
      UserSide user;
      user_side(ks, m, s, users[u], exclude_seen, field_ws[t], user);
      auto [items, n_items] = list_of(u, scratch[t]);
      const index_t keep = approx ? approx_keep(approx_fraction, n_items, k, user) : n_items;
      if (keep < n_items) {
        approx_stage(ks, m, cache, tail, user, items, n_items, keep, 1, &tail_ws[t], approx_buf[t]);
        items = approx_buf[t].kept.data();
        n_items = keep;
      }
      std::vector<Scored> heap;
      score_range(ks, m, cache, tail, user, items, 0, n_items, k, tail_ws[t], heap);
      write_top(m, heap, k, out_items + u * k, out_scores + u * k);
    });
    return;
  }
  std::vector<std::vector<Scored>> chunk_best(static_cast<std::size_t>(max_chunks));
  for (index_t u = 0; u < n_users; ++u) {
    UserSide user;
    user_side(ks, m, s, users[u], exclude_seen, field_ws[0], user);
    const std::pair<const std::int32_t*, index_t> list = list_of(u, scratch[0]);
    const std::int32_t* items = list.first;  // not a structured binding: the lambda below captures it (C++17)
    index_t n_items = list.second;
    const index_t keep = approx ? approx_keep(approx_fraction, n_items, k, user) : n_items;
    index_t unit = chunk;
    if (keep < n_items) {
      approx_stage(ks, m, cache, tail, user, items, n_items, keep, threads, tail_ws.data(), approx_buf[0]);
      items = approx_buf[0].kept.data();
      n_items = keep;
      // The kept items are a few chunks at most: smaller units (4 per thread, whole blocks, 8 blocks at least)
      // keep both threads busy to the end.
      const index_t block = kBlockPanels * ks.mr;
      const index_t per_unit = (n_items + 4 * threads - 1) / (4 * threads);
      unit = std::min(chunk, std::max(8 * block, (per_unit + block - 1) / block * block));
    }
    const index_t n_chunks = (n_items + unit - 1) / unit;
    if (static_cast<index_t>(chunk_best.size()) < n_chunks) chunk_best.resize(static_cast<std::size_t>(n_chunks));
    parallel_for<true>(0, n_chunks, threads, [&](std::int64_t c) {
      std::vector<Scored>& heap = chunk_best[static_cast<std::size_t>(c)];
      heap.clear();
      score_range(ks, m, cache, tail, user, items, c * unit, std::min(unit, n_items - c * unit), k,
                  tail_ws[static_cast<std::size_t>(thread_id())], heap);
    });
    std::vector<Scored> heap;
    for (index_t c = 0; c < n_chunks; ++c)
      for (const Scored& entry : chunk_best[static_cast<std::size_t>(c)]) push_top(heap, k, entry);
    write_top(m, heap, k, out_items + u * k, out_scores + u * k);
  }
}

}  // namespace

void field_topk(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s, const std::int32_t* users,
                index_t n_users, const std::int32_t* candidates, index_t n_candidates, index_t k, bool exclude_seen,
                std::int32_t* out_items, float* out_scores, TopkCache& cache, int n_threads,
                double approx_fraction) {
  const index_t n_items = candidates ? n_candidates : s.n_items;
  topk_lists(
      ks, m, s, users, n_users, n_items,
      [&](std::int64_t, std::vector<std::int32_t>&) { return std::pair<const std::int32_t*, index_t>(candidates, n_items); },
      k, exclude_seen, out_items, out_scores, cache, n_threads, approx_fraction);
}

void field_topk_proxy(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s, std::int32_t user_key,
                      const std::int32_t* candidates, index_t n_candidates, TopkCache& cache,
                      std::vector<std::int32_t>& sample, std::vector<float>& coef, float* proxy) {
  if (m.mlp.layers.size() < 2) throw std::invalid_argument("the approximate top-k needs an MLP of two layers or more");
  {
    const std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.n_items != s.n_items) build_topk_cache(ks, m, s, cache, 1);
    if (cache.bf16_items != cache.n_items) build_bf16_cache(m, cache, 1);
  }
  const index_t n = candidates ? n_candidates : s.n_items;
  FieldWorkspace fws(m, 1, false);
  UserSide user;
  user_side(ks, m, s, user_key, false, fws, user);
  const PackedTail tail(ks, m.mlp);
  TailWorkspace ws(ks, m.mlp);
  Surrogate sur;
  fit_surrogate(ks, m, cache, tail, user, candidates, n, 1, &ws, sur, &sample);
  const index_t h = m.mlp.layers[0].fan_out;
  std::vector<float> a(static_cast<std::size_t>(cache.bf16_ld));  // back from the pair-split order
  for (index_t j = 0; j < cache.bf16_ld; j += 32)
    for (index_t i = 0; i < 16; ++i) {
      a[j + 2 * i] = sur.a[j + i];
      a[j + 2 * i + 1] = sur.a[j + 16 + i];
    }
  coef.assign(a.begin(), a.begin() + h);
  coef.push_back(sur.bias);
  std::vector<std::int32_t> iota;
  for (index_t p0 = 0; p0 < n; p0 += kProxyChunk)
    proxy_range(ks, m, cache, sur, user, candidates, p0, std::min(kProxyChunk, n - p0), iota, proxy + p0);
}

void field_topk_candidates(const KernelSet& ks, const FieldModel& m, const NegativeSampler& s,
                           const std::int32_t* users, index_t n_users, const std::int64_t* cand_indptr,
                           const std::int32_t* cand_items, index_t k, bool exclude_seen, std::int32_t* out_items,
                           float* out_scores, TopkCache& cache, int n_threads) {
  index_t longest = 0;
  for (index_t u = 0; u < n_users; ++u) longest = std::max<index_t>(longest, cand_indptr[u + 1] - cand_indptr[u]);
  // Each list sorted and deduplicated into the thread's scratch: a duplicate would take two of the k places,
  // and ascending items read the cached item rows in address order.
  auto list_of = [&](std::int64_t u, std::vector<std::int32_t>& scratch) {
    scratch.assign(cand_items + cand_indptr[u], cand_items + cand_indptr[u + 1]);
    std::sort(scratch.begin(), scratch.end());
    scratch.erase(std::unique(scratch.begin(), scratch.end()), scratch.end());
    return std::pair<const std::int32_t*, index_t>(scratch.data(), static_cast<index_t>(scratch.size()));
  };
  topk_lists(ks, m, s, users, n_users, longest, list_of, k, exclude_seen, out_items, out_scores, cache, n_threads,
             0.0);
}

RowPredictor::RowPredictor(const FieldModel& model, bool copy_weights)
    : m_(model), ws_(new FieldWorkspace(model, 1, false)), key_rows_(static_cast<std::size_t>(model.n_keys), -1),
      mlp_(&model.mlp) {
  if (copy_weights) {  // each array at a multiple of 16 floats (64 bytes) of one aligned buffer
    auto padded = [](index_t n) { return static_cast<std::size_t>((n + 15) / 16 * 16); };
    std::size_t total = 0;
    for (const Layer& layer : model.mlp.layers) total += padded(layer.fan_in * layer.fan_out) + padded(layer.fan_out);
    float* at = weights_.get(std::max<std::size_t>(total, 1));
    mlp_copy_ = model.mlp;
    for (Layer& layer : mlp_copy_.layers) {
      const std::size_t w = static_cast<std::size_t>(layer.fan_in * layer.fan_out);
      std::memcpy(at, layer.W, sizeof(float) * w);
      layer.W = at;
      at += padded(layer.fan_in * layer.fan_out);
      std::memcpy(at, layer.b, sizeof(float) * static_cast<std::size_t>(layer.fan_out));
      layer.b = at;
      at += padded(layer.fan_out);
    }
    mlp_ = &mlp_copy_;
  }
  for (int k = 0; k < model.n_keys; ++k) {  // validate(model, examples)'s bounds, found once
    index_t& rows = key_rows_[static_cast<std::size_t>(k)];
    for (const EmbeddingField& f : model.fields)
      if (f.key == k) rows = rows < 0 ? f.bags.rows : std::min(rows, f.bags.rows);
    for (const DenseBlock& d : model.dense)
      if (d.key == k) rows = rows < 0 ? d.rows : std::min(rows, d.rows);
  }
}

RowPredictor::~RowPredictor() { delete ws_; }

// logits_rows of one row, pooled straight from the bag tables (no gathered batch CSR: the bag's own entries,
// the same ids and weights in the same order) and the MLP by forward_row: the same numbers.
float RowPredictor::predict(const KernelSet& ks, const std::int32_t* keys) {
  for (int k = 0; k < m_.n_keys; ++k) {
    const index_t rows = key_rows_[static_cast<std::size_t>(k)];
    if (rows >= 0 && (keys[k] < 0 || keys[k] >= rows))  // validate's check and message
      require(false, "key column " + std::to_string(k) + " must hold values in [0, " + std::to_string(rows) + ")");
  }
  FieldWorkspace& ws = *ws_;
  float* x = ws.x.data();
  // The bag of row keys[f.key] pooled into out: csr_matmul's sum for one row (sparse.cpp weighted_rows: one
  // entry is a scaled copy, more go to row_sum), without its per-call dispatch (ten fields: ~0.5 µs).
  auto pool = [&](const EmbeddingField& f, float* out) {
    const std::int64_t q = keys[f.key], p = f.bags.indptr[q], count = f.bags.indptr[q + 1] - p;
    if (count != 1) return ks.row_sum(f.bags.weights + p, f.bags.ids + p, count, f.table, f.dim, f.dim, out);
    const float w = f.bags.weights[p], *row = f.table + static_cast<index_t>(f.bags.ids[p]) * f.dim;
    for (index_t j = 0; j < f.dim; ++j) out[j] = w * row[j];
  };
  for (std::size_t i = 0; i < m_.fields.size(); ++i) {
    const EmbeddingField& f = m_.fields[i];
    if (f.wide) continue;
    if (f.offset >= 0) pool(f, x + f.offset);
    if (static_cast<int>(i) == m_.gmf.field_u || static_cast<int>(i) == m_.gmf.field_v)
      pool(f, ws.pooled_gmf[static_cast<int>(i) == m_.gmf.field_u ? 0 : 1].data());
  }
  for (const DenseBlock& b : m_.dense)
    std::memcpy(x + b.offset, b.table + static_cast<index_t>(keys[b.key]) * b.cols,
                sizeof(float) * static_cast<std::size_t>(b.cols));
  float logit = forward_row(ks, *mlp_, x, ws.mlp)[0];
  for (const EmbeddingField& f : m_.fields) {  // wide fields: their pooled scalar joins the logit
    if (!f.wide) continue;
    float wide = 0.0f;
    pool(f, &wide);  // csr_matmul's one-column sum (the batch path's), without its dispatch
    logit += wide;
  }
  if (m_.gmf.field_u >= 0) {
    const index_t d = m_.fields[static_cast<std::size_t>(m_.gmf.field_u)].dim;
    const float *u = ws.pooled_gmf[0].data(), *v = ws.pooled_gmf[1].data();
    float s = 0.0f;
    for (index_t j = 0; j < d; ++j) s += m_.gmf.w[j] * u[j] * v[j];
    logit += s;
  }
  return m_.bce() ? stable_sigmoid(logit) : logit;
}

TowerPass::TowerPass(const FieldModel& model, index_t rows, bool training)
    : m_(model), ws_(new FieldWorkspace(model, std::max<index_t>(rows, 1), training)) {}

TowerPass::~TowerPass() { delete ws_; }

const float* TowerPass::forward(const KernelSet& ks, const std::int32_t* keys, index_t n,
                                const std::uint64_t* dropout_stream, int n_threads) {
  n_ = n;
  ws_->keys[0].assign(keys, keys + n);
  batch_bags(m_, n, *ws_, n_threads, dropout_stream);
  const int blocks = row_blocks(m_.mlp, n, n_threads);
  const Input in = mlp_input(m_, n, *ws_);
  if (blocks == 1) {
    pool_rows(ks, m_, *ws_, 0, n, n_threads);
    forward_rows(ks, m_.mlp, in, ws_->mlp, 0, n, n_threads);
  } else {
    parallel_for(0, blocks, blocks, [&](std::int64_t b) {
      const auto [r0, r1] = block_rows(n, blocks, b);
      pool_rows(ks, m_, *ws_, r0, r1, 1);
      forward_rows(ks, m_.mlp, in, ws_->mlp, r0, r1, 1);
    });
  }
  return ws_->mlp.acts[m_.mlp.layers.size()].data();
}

float* TowerPass::output_gradient() { return ws_->mlp.deltas.back().data(); }

double TowerPass::backward(const KernelSet& ks, float alpha, double denominator, GradientSink& mlp_sink,
                           const FieldSink& field_sink, int n_threads) {
  const index_t n = n_;
  FieldWorkspace& ws = *ws_;
  const float inv_n = static_cast<float>(1.0 / denominator);
  const Input in = mlp_input(m_, n, ws);
  index_t dx_cols = 0;  // input columns up to the last embedding field's end: dense blocks need no gradient
  for (const EmbeddingField& f : m_.fields) dx_cols = std::max(dx_cols, f.offset + f.dim);
  Backward pass(ks, m_.mlp, in, alpha, denominator, ws.mlp);
  pass.products(n_threads, nullptr, dx_cols > 0 ? ws.dx.data() : nullptr, m_.width, dx_cols);
  ws.field_squares.assign(m_.fields.size(), 0.0);
  auto field_backward = [&](std::size_t i, int threads) {
    const EmbeddingField& f = m_.fields[i];
    FieldWorkspace::FieldBatch& fb = ws.fields[i];
    const CsrView bags{fb.indptr.data(), fb.ids.data(), fb.weights.data(), n, f.vocab};
    group_by_column(bags, fb.touched);
    fb.grad.resize(fb.touched.ids.size() * static_cast<std::size_t>(f.dim));
    const float alpha_f = f.alpha >= 0.0f ? f.alpha : alpha;
    const double squares = touched_rows_gradient(ks, fb.touched, ws.dx.data() + f.offset, m_.width, f.table, f.dim,
                                                 alpha_f, inv_n, fb.grad.data(), fb.row_squares, threads);
    ws.field_squares[i] = 0.5 * alpha_f * squares / denominator;
    field_sink(i, fb.touched, fb.grad.data(), threads);
  };
  const int threads = field_threads(m_, n, n_threads);
  const bool spread = fields_spread(m_, threads);
  double loss = pass.apply(mlp_sink, n_threads, spread ? static_cast<std::int64_t>(m_.fields.size()) : 0,
                           [&](std::int64_t i) { field_backward(static_cast<std::size_t>(i), 1); });
  for (std::size_t i = 0; !spread && i < m_.fields.size(); ++i) field_backward(i, threads);
  for (double term : ws.field_squares) loss += term;
  return loss;
}

// ---- FieldBatchPass (differentially private training, private.cpp) ----
FieldBatchPass::FieldBatchPass(const FieldModel& model, index_t rows)
    : m_(model), ws_(new FieldWorkspace(model, std::max<index_t>(rows, 1), true)) {}

FieldBatchPass::~FieldBatchPass() { delete ws_; }

index_t FieldBatchPass::gather(const Examples& ex, const std::int64_t* rows, index_t n_pos,
                               const NegativeSampler& sampler, std::uint64_t stream) {
  gather_examples(ex, rows, n_pos, *ws_);
  n_ = append_negatives(sampler, n_pos, stream, *ws_);
  return n_;
}

double FieldBatchPass::run(const KernelSet& ks, std::uint64_t dropout_stream, int n_threads) {
  FieldWorkspace& ws = *ws_;
  const index_t n = n_;
  batch_bags(m_, n, ws, n_threads, &dropout_stream);
  index_t dx_cols = 0;
  for (const EmbeddingField& f : m_.fields)
    if (f.offset >= 0) dx_cols = std::max(dx_cols, f.offset + f.dim);
  const Input in = mlp_input(m_, n, ws);
  Backward pass(ks, m_.mlp, in, 0.0f, static_cast<double>(n), ws.mlp);
  pass.weight_gradients = false;  // computed from the clipped deltas instead
  pass.products(
      n_threads,
      [&](index_t r0, index_t r1, int threads) {
        logits_rows(ks, m_, n, ws, r0, r1, threads);
        loss_rows(m_, ws, r0, r1);
      },
      dx_cols > 0 ? ws.dx.data() : nullptr, m_.width, dx_cols);
  double loss = 0.0;
  for (index_t c = 0; c < (n + kGradientChunkRows - 1) / kGradientChunkRows; ++c)
    loss += ws.loss_parts[static_cast<std::size_t>(c)];
  return loss;
}

const float* FieldBatchPass::layer_input(std::size_t l) const {
  return l == 0 ? ws_->x.data() : ws_->mlp.acts[l].data();
}
index_t FieldBatchPass::layer_input_ld(std::size_t l) const { return l == 0 ? m_.width : m_.mlp.layers[l].fan_in; }
const float* FieldBatchPass::delta(std::size_t l) const { return ws_->mlp.deltas[l].data(); }
const float* FieldBatchPass::dx() const { return ws_->dx.data(); }
const float* FieldBatchPass::gmf_pooled(int side) const { return ws_->pooled_gmf[static_cast<std::size_t>(side)].data(); }
const float* FieldBatchPass::gmf_delta(int side) const { return ws_->d_gmf[static_cast<std::size_t>(side)].data(); }
CsrView FieldBatchPass::bags(std::size_t i) const {
  const FieldWorkspace::FieldBatch& fb = ws_->fields[i];
  return CsrView{fb.indptr.data(), fb.ids.data(), fb.weights.data(), n_, m_.fields[i].vocab};
}

}  // namespace fastrec
