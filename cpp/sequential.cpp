#include "sequential.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "aligned.h"
#include "gemm.h"
#include "parallel.h"

namespace fastrec {

std::pair<index_t, index_t> SeqModel::shape(std::size_t i) const {
  if (i == 0) return {n_items, dim};
  if (i == 1) return {max_len, dim};
  if (i >= arrays.size() - 2) return {dim, 0};
  const std::size_t b = (i - 2) / kSeqBlockArrays;
  const int k = static_cast<int>((i - 2) % kSeqBlockArrays);
  const index_t f = ffn[b];
  switch (k) {
    case kWq: case kWk: case kWv: case kWo: return {dim, dim};
    case kW1: return {dim, f};
    case kB1: return {f, 0};
    case kW2: return {f, dim};
    default: return {dim, 0};
  }
}

SeqModel seq_layout(index_t n_items, index_t dim, index_t max_len, int heads, const std::vector<index_t>& ffn) {
  SeqModel m;
  m.n_items = n_items;
  m.dim = dim;
  m.max_len = max_len;
  m.heads = heads;
  m.ffn = ffn;
  m.arrays.assign(4 + kSeqBlockArrays * ffn.size(), nullptr);
  return m;
}

void validate(const SeqModel& m) {
  require(m.n_items >= 1, "the item table needs at least one row");
  require(m.dim >= 1, "the item table needs at least one column");
  require(m.max_len >= 1, "the position table needs at least one row");
  require(m.heads >= 1 && m.dim % m.heads == 0,
          "heads must be a positive divisor of the width " + std::to_string(m.dim) + ", got " +
              std::to_string(m.heads));
  for (index_t f : m.ffn) require(f >= 1, "every block's feed-forward width must be >= 1");
  require(m.arrays.size() == 4 + kSeqBlockArrays * m.ffn.size(), "wrong number of parameter arrays");
  for (float* a : m.arrays) require(a != nullptr, "missing parameter array");
  const SeqItemFeatures& f = m.features;
  if (!f.on()) return;
  require(f.n_features >= 1, "the feature table needs at least one row");
  require(f.indptr && f.ids && f.weights, "item features need indptr, ids and weights");
  require(f.indptr[0] == 0, "item features: indptr[0] must be 0");
  for (index_t i = 0; i < m.n_items; ++i)
    require(f.indptr[i + 1] >= f.indptr[i], "item features: indptr must be non-decreasing");
  for (std::int64_t k = 0; k < f.indptr[m.n_items]; ++k) {
    if (f.ids[k] < 0 || f.ids[k] >= f.n_features)  // the message is built only on failure: this runs per entry
      require(false, "item features: ids must be feature rows in [0, " + std::to_string(f.n_features) + ")");
    require(std::isfinite(f.weights[k]), "item features: weights must be finite");
  }
}

namespace {

constexpr float kLayerNormEps = 1e-5f;
constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr index_t kAttWidth = 16;       // the attention kernels' column group (kernels.h, RowsColsFn)
constexpr index_t kRowChunk = 32;        // rows per task of the row-wise passes
constexpr index_t kForwardRows = 8192;   // slots (sequences x L) per pass of seq_forward: bounds its workspace

index_t round_up(index_t n, index_t to) { return (n + to - 1) / to * to; }

// A grow-only float buffer, uninitialised: sized for the largest batch once, so that later batches neither
// page-fault on fresh memory nor zero-fill it.
class Floats {
 public:
  float* resize(index_t n, index_t capacity) {
    size_ = n;
    return buf_.get(static_cast<std::size_t>(std::max(n, capacity)));
  }
  float* data() { return buf_.data(); }
  const float* data() const { return buf_.data(); }
  float& operator[](index_t i) { return buf_.data()[i]; }
  const float& operator[](index_t i) const { return buf_.data()[i]; }
  index_t size() const { return size_; }

 private:
  AlignedBuffer buf_;
  index_t size_ = 0;
};

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

// body(r0, r1) over [0, n) in chunks of kRowChunk rows (per-row work: any split gives the same results).
template <class Body>
void for_rows(index_t n, int n_threads, Body&& body) {
  const index_t chunks = (n + kRowChunk - 1) / kRowChunk;
  const int threads = n * 1024 < (1 << 20) ? 1 : n_threads;  // a few rows: not worth waking threads
  parallel_for(0, chunks, threads, [&](std::int64_t c) {
    const index_t r0 = c * kRowChunk;
    body(r0, std::min(n, r0 + kRowChunk));
  });
}

// What column_sums needs: weights 1 and row ids 0, 1, ... for at least `rows` rows.
struct RowSumIds {
  std::vector<float> ones;
  std::vector<std::int32_t> ids;
  void fit(index_t rows) {
    for (index_t r = static_cast<index_t>(ids.size()); r < rows; ++r) {
      ones.push_back(1.0f);
      ids.push_back(static_cast<std::int32_t>(r));
    }
  }
};

// out[c] = sum over r in order of a[r * ld + c], c < n: the row_sum kernel with weights 1, split over threads
// by columns (each column's chain is the same whatever the split): up to 64 columns per task, but at least
// one task per thread (a width-64 sum would otherwise run on one thread while the others wait).
void column_sums(const KernelSet& ks, const RowSumIds& rs, const float* a, index_t ld, index_t rows, index_t n,
                 float* out, int n_threads) {
  const int threads = rows * n < (1 << 18) ? 1 : resolve_threads(n_threads);
  const index_t kCols = std::min<index_t>(64, std::max<index_t>(16, round_up((n + threads - 1) / threads, 16)));
  const index_t chunks = (n + kCols - 1) / kCols;
  parallel_for(0, chunks, threads, [&](std::int64_t c) {
    const index_t c0 = c * kCols;
    ks.row_sum(rs.ones.data(), rs.ids.data(), rows, a + c0, ld, std::min(kCols, n - c0), out + c0);
  });
}

// The dropout multipliers of site `site` (reference.dropout_scale) for rows r0 .. r1 - 1, whose element
// offsets in the (B, L, d) activation start at pos[r] * d: counter-based, so a row's mask never depends on
// the thread.
struct DropoutSite {
  std::uint64_t key = 0, threshold = 0;
  float scale = 1.0f;
  DropoutSite(std::uint64_t stream, int site, double rate) {
    std::uint64_t state = stream + static_cast<std::uint64_t>(site);
    key = splitmix64(state);
    threshold = static_cast<std::uint64_t>(rate * 16777216.0);
    scale = 1.0f / static_cast<float>(1.0 - rate);
  }
  void rows(const KernelSet& ks, const index_t* pos, index_t r0, index_t r1, index_t d, float* mask) const {
    for (index_t r = r0; r < r1; ++r)
      ks.dropout_row(key, static_cast<std::uint64_t>(pos[r] * d) + 1, d, threshold, scale, mask + r * d);
  }
};

// Layer norm of rows: xhat, rstd cached for the backward pass, y = xhat * gamma + beta.
void ln_forward(const KernelSet& ks, const float* x, index_t rows, index_t d, const float* gamma, const float* beta,
                const float*, float* xhat, float* rstd, float* y, int n_threads) {
  for_rows(rows, n_threads, [&](index_t r0, index_t r1) {
    ks.layer_norm(x + r0 * d, r1 - r0, d, gamma, beta, kLayerNormEps, xhat + r0 * d, rstd + r0, y + r0 * d);
  });
}

// dx += layer norm backward of dy; dgamma, dbeta = sums over rows. p is (rows x d) scratch.
void ln_backward(const KernelSet& ks, const RowSumIds& rs, const float* dy, const float* gamma, const float* xhat,
                 const float* rstd, index_t rows, index_t d, const float*, float* p, float* dx, float* dgamma,
                 float* dbeta, int n_threads) {
  for_rows(rows, n_threads, [&](index_t r0, index_t r1) {
    ks.layer_norm_backward(dy + r0 * d, gamma, xhat + r0 * d, rstd + r0, r1 - r0, d, p + r0 * d, dx + r0 * d);
  });
  column_sums(ks, rs, p, d, rows, d, dgamma, n_threads);
  column_sums(ks, rs, dy, d, rows, d, dbeta, n_threads);
}

// What one block keeps from its forward pass for the backward pass.
struct BlockCache {
  std::vector<float> wcat, bcat;  // Wq | Wk | Wv (d x 3d) and their biases, side by side
  Floats xhat1, rstd1, h1, qkv, att, o, da, xhat2, rstd2, h2, u, df;
};

}  // namespace

// The buffers of a batch: its compacted rows, the blocks' caches, the backward pass's scratch.
struct SeqWorkspace {
  const SeqModel& m;
  index_t B = 0, R = 0, att_total = 0;
  index_t rows_cap = 0, att_cap = 0;  // the largest batch's possible rows (B x L) and attention weights
  std::vector<index_t> pos;        // R: slot b * L + t of each row
  std::vector<index_t> row_of;     // B * L: the row of a slot, -1 at padding
  std::vector<index_t> seq_start;  // B + 1: sequence s has rows [seq_start[s], seq_start[s + 1])
  std::vector<index_t> att_start;  // B: offset of sequence s's attention weights (heads x c x round_up(c, 16))
  std::vector<std::int32_t> items;  // R
  std::vector<float> ones;
  RowSumIds row_sum_ids;
  Floats x, t1, mask0, xhatf, rstdf, z;
  std::vector<BlockCache> blocks;
  // backward
  Floats dz, dx, dh, dbig, dqkv, gscratch;
  std::vector<float> gwcat, gbcat;
  std::vector<std::vector<float>> grad;  // canonical order; grad[0] (item table) unused
  // loss
  std::vector<index_t> active;       // N: slots with a target
  Floats src;                        // (R + N) x d: dx0 rows, then the active positions' z
  Floats cand;                       // N (1 + K) x d: each position's target and negatives' item rows
  std::vector<std::int32_t> cand_ids;
  std::vector<float> cand_g;         // dLoss/dscore of each candidate
  std::vector<double> pos_loss;
  std::vector<float> dz_pad;         // dz of active slots at padding (z = final_beta there)
  // sampled softmax: the batch's distinct targets as candidates
  bool softmax = false;
  index_t n_cand = 0;
  std::vector<index_t> target_col;   // N: each position's column among the candidates
  std::vector<float> cand_bias;      // C: minus each candidate's log-Q correction
  Floats scores, dz_rows;            // N x C logits, then their gradients; N x d
  // item-row gradients: entries grouped by item, first-appearance order
  std::vector<std::int32_t> slot;    // n_items, -1 (reset after each use)
  std::vector<std::int32_t> group_ids, entry_group, entry_src, grouped_src;
  std::vector<std::int64_t> group_start;
  std::vector<float> entry_w, grouped_w;
  Floats group_grad;
  std::vector<std::int32_t> seq_ids;  // 0..K: ids of one position's candidates
  // item features: the composite vectors of the batch's distinct items (vitems, first-appearance order; vslot:
  // item -> its row, -1 elsewhere, reset when the next batch starts), and the feature rows' gradients
  // (fgroup_ids, grouped like the item rows')
  std::vector<std::int32_t> vslot, vitems;
  Floats vrows;
  std::vector<std::int32_t> fslot, fgroup_ids, fentry_group, fentry_src, fgrouped_src;
  std::vector<std::int64_t> fgroup_start;
  std::vector<float> fentry_w, fgrouped_w;
  Floats fgroup_grad;

  // Item `item`'s vector: its composite row with item features, else its row of the item table.
  const float* vec(std::int32_t item) const {
    if (!m.features.on()) return m.item_table() + static_cast<index_t>(item) * m.dim;
    return vrows.data() + static_cast<index_t>(vslot[static_cast<std::size_t>(item)]) * m.dim;
  }

  SeqPrecision precision = SeqPrecision::Float32;  // of the dense products (dense_gemm); set by each call

  explicit SeqWorkspace(const SeqModel& model) : m(model) {
    ones.assign(static_cast<std::size_t>(std::max<index_t>(model.dim, 1)), 1.0f);
  }
};

namespace {

// A projection or feed-forward product (sgemm's contract) in the call's precision.
void dense_gemm(const KernelSet& ks, const SeqWorkspace& ws, bool trans_a, bool trans_b, index_t M, index_t N,
                index_t K, const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc,
                const Epilogue* epilogue, int n_threads) {
  if (ws.precision == SeqPrecision::Float32)
    sgemm(ks, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
  else
    bf16_gemm_rows(ks, ws.precision == SeqPrecision::Bf16Native, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc,
                   epilogue, n_threads);
}

// A weight gradient C = Xᵀ dY over the batch's R rows (sgemm's trans_a product) in the call's precision, and
// the bias gradient, dY's column sums (column_sums' bits), into bias_grad.
void weight_gradient(const KernelSet& ks, const SeqWorkspace& ws, index_t M, index_t N, index_t K, const float* X,
                     index_t ldx, const float* dY, index_t ldy, float* C, index_t ldc, float* bias_grad,
                     int n_threads) {
  if (ws.precision == SeqPrecision::Bf16Native) {  // the sums from the rows the product loads anyway
    seq_bf16_weight_gradient(ks, true, M, N, K, X, ldx, dY, ldy, C, ldc, bias_grad, n_threads);
    return;
  }
  if (ws.precision == SeqPrecision::Float32)
    sgemm(ks, true, false, M, N, K, X, ldx, dY, ldy, C, ldc, nullptr, n_threads);
  else
    bf16_gemm(ks, false, true, false, M, N, K, X, ldx, dY, ldy, C, ldc, nullptr, n_threads);
  column_sums(ks, ws.row_sum_ids, dY, ldy, K, N, bias_grad, n_threads);
}

index_t max_ffn(const SeqModel& m) {
  index_t f = 0;
  for (index_t v : m.ffn) f = std::max(f, v);
  return f;
}

// Compacts the batch's event slots into rows.
void prepare(SeqWorkspace& ws, const std::int32_t* seqs, index_t B) {
  const SeqModel& m = ws.m;
  const index_t L = m.max_len;
  ws.B = B;
  ws.pos.clear();
  ws.items.clear();
  ws.row_of.assign(static_cast<std::size_t>(B * L), -1);
  ws.seq_start.assign(static_cast<std::size_t>(B + 1), 0);
  ws.att_start.assign(static_cast<std::size_t>(B), 0);
  index_t att = 0;
  for (index_t s = 0; s < B; ++s) {
    ws.seq_start[s] = static_cast<index_t>(ws.pos.size());
    for (index_t t = 0; t < L; ++t) {
      const std::int32_t item = seqs[s * L + t];
      if (item < 0) continue;
      ws.row_of[s * L + t] = static_cast<index_t>(ws.pos.size());
      ws.pos.push_back(s * L + t);
      ws.items.push_back(item);
    }
    const index_t c = static_cast<index_t>(ws.pos.size()) - ws.seq_start[s];
    ws.att_start[s] = att;
    att += m.heads * c * round_up(c, kAttWidth);
  }
  ws.seq_start[B] = ws.R = static_cast<index_t>(ws.pos.size());
  ws.att_total = att;
  ws.rows_cap = std::max(ws.rows_cap, B * L);
  ws.att_cap = std::max(ws.att_cap, B * m.heads * L * round_up(L, kAttWidth));
  const index_t R = ws.R, d = m.dim, cap = ws.rows_cap;
  ws.x.resize(R * d, cap * d);
  ws.t1.resize(R * std::max(d, max_ffn(m)), cap * std::max(d, max_ffn(m)));
  ws.xhatf.resize(R * d, cap * d);
  ws.rstdf.resize(R, cap);
  ws.z.resize(R * d, cap * d);
}

// Item features: forget the previous batch's composite rows (only their slots are reset).
void begin_composites(SeqWorkspace& ws) {
  if (!ws.m.features.on()) return;
  if (ws.vslot.size() != static_cast<std::size_t>(ws.m.n_items))
    ws.vslot.assign(static_cast<std::size_t>(ws.m.n_items), -1);
  for (std::int32_t item : ws.vitems) ws.vslot[static_cast<std::size_t>(item)] = -1;
  ws.vitems.clear();
}

void need_composite(SeqWorkspace& ws, std::int32_t item) {
  std::int32_t& slot = ws.vslot[static_cast<std::size_t>(item)];
  if (slot < 0) {
    slot = static_cast<std::int32_t>(ws.vitems.size());
    ws.vitems.push_back(item);
  }
}

// The composite rows of ws.vitems: E[i] + sum_k w_k F[f_k], terms added in CSR order (one chain per element).
void build_composites(SeqWorkspace& ws, int n_threads) {
  const SeqModel& m = ws.m;
  const SeqItemFeatures& f = m.features;
  const index_t d = m.dim, V = static_cast<index_t>(ws.vitems.size());
  float* rows = ws.vrows.resize(V * d, V * d);
  for_rows(V, n_threads, [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const std::int32_t item = ws.vitems[static_cast<std::size_t>(r)];
      float* v = rows + r * d;
      std::memcpy(v, m.item_table() + static_cast<index_t>(item) * d, sizeof(float) * static_cast<std::size_t>(d));
      for (std::int64_t k = f.indptr[item]; k < f.indptr[item + 1]; ++k) {
        const float w = f.weights[k];
        const float* e = f.table + static_cast<index_t>(f.ids[k]) * d;
        for (index_t c = 0; c < d; ++c) v[c] += w * e[c];
      }
    }
  });
}

// The composite rows a batch reads: its inputs, and its targets and negatives (may be null).
void batch_composites(SeqWorkspace& ws, const std::int32_t* targets, const std::int32_t* negatives, index_t K,
                      int n_threads) {
  if (!ws.m.features.on()) return;
  begin_composites(ws);
  for (std::int32_t item : ws.items) need_composite(ws, item);
  const index_t slots = ws.B * ws.m.max_len;
  if (targets)
    for (index_t i = 0; i < slots; ++i) {
      if (targets[i] < 0) continue;
      need_composite(ws, targets[i]);
      if (negatives)
        for (index_t j = 0; j < K; ++j) need_composite(ws, negatives[i * K + j]);
    }
  build_composites(ws, n_threads);
}

void resize_cache(BlockCache& c, const SeqWorkspace& ws, index_t f, bool dropout) {
  const index_t R = ws.R, d = ws.m.dim, cap = ws.rows_cap;
  c.wcat.resize(static_cast<std::size_t>(3 * d * d));
  c.bcat.resize(static_cast<std::size_t>(3 * d));
  c.xhat1.resize(R * d, cap * d);
  c.rstd1.resize(R, cap);
  c.h1.resize(R * d, cap * d);
  c.qkv.resize(3 * R * d, 3 * cap * d);
  c.att.resize(ws.att_total, ws.att_cap);
  c.o.resize(R * d, cap * d);
  c.xhat2.resize(R * d, cap * d);
  c.rstd2.resize(R, cap);
  c.h2.resize(R * d, cap * d);
  c.u.resize(R * f, cap * f);
  if (dropout) {
    c.da.resize(R * d, cap * d);
    c.df.resize(R * d, cap * d);
  }
}

// One (sequence, head)'s n rows of a head's dh columns as rows of w = round_up(dh, 16) floats, the layout
// the attention kernels read and write: in place when dh == w, else through a zero-padded copy.
struct HeadRows {
  const float* src;
  index_t ld, n, dh, w;
  std::vector<float>* buf;
  const float* in(index_t& ld_out) const {
    if (dh == w) {
      ld_out = ld;
      return src;
    }
    buf->assign(static_cast<std::size_t>(n * w), 0.0f);
    for (index_t t = 0; t < n; ++t) std::memcpy(buf->data() + t * w, src + t * ld, sizeof(float) * static_cast<std::size_t>(dh));
    ld_out = w;
    return buf->data();
  }
};

// Where a kernel writes a head's rows (dst, ld): in place when dh == w, else a padded tile copied out by done().
struct HeadOut {
  float* dst;
  index_t ld, n, dh, w;
  std::vector<float>* buf;
  float* out(index_t& ld_out) {
    if (dh == w) {
      ld_out = ld;
      return dst;
    }
    buf->resize(static_cast<std::size_t>(n * w));
    ld_out = w;
    return buf->data();
  }
  void done() {
    if (dh == w) return;
    for (index_t t = 0; t < n; ++t) std::memcpy(dst + t * ld, buf->data() + t * w, sizeof(float) * static_cast<std::size_t>(dh));
  }
};

// Per-thread tiles of the attention kernels.
struct AttTiles {
  std::vector<float> t, q, k, v, g, o, ds;
};

// Causal softmax of score rows t0 .. t1 - 1 (stride ld) in place: row t over its first t + 1 columns.
void causal_softmax(const KernelSet& ks, float* A, index_t ld, index_t t0, index_t t1) {
  for (index_t t = t0; t < t1; ++t) {
    float* row = A + t * ld;
    float mx, sum;
    ks.exp_shift(row, t + 1, &mx, &sum);
    const float inv = 1.0f / sum;
    for (index_t j = 0; j <= t; ++j) row[j] *= inv;
  }
}

// Causal attention of every (sequence, head) on the block's q, k, v: weights into c.att (row t valid over
// its first t + 1 columns), output into c.o. One fused pass per (sequence, head) over tiles in cache: the
// scores against the packed Kᵀ (lower triangle, in 16-column groups), the masked softmax, A V.
void attention_forward(const KernelSet& ks, SeqWorkspace& ws, BlockCache& c, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, H = m.heads, dh = d / H, ld = 3 * d, w = round_up(dh, kAttWidth);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh)));
  parallel_for<true>(0, ws.B * H, n_threads, [&](std::int64_t task) {
    const index_t s = task / H, h = task % H;
    const index_t r0 = ws.seq_start[s], n = ws.seq_start[s + 1] - r0, np = round_up(n, kAttWidth);
    if (n == 0) return;
    thread_local AttTiles tl;
    float* A = c.att.data() + ws.att_start[s] + h * n * np;
    const float* base = c.qkv.data() + r0 * ld + h * dh;
    index_t ldq, ldv, ldo;
    const float* Q = HeadRows{base, ld, n, dh, w, &tl.q}.in(ldq);
    const float* V = HeadRows{base + 2 * d, ld, n, dh, w, &tl.v}.in(ldv);
    tl.t.resize(static_cast<std::size_t>(w * np));
    ks.att_transpose(base + d, ld, n, dh, w, np, tl.t.data());
    ks.att_rows_cols(Q, ldq, 0, n, tl.t.data(), np, w, scale, A, np);
    causal_softmax(ks, A, np, 0, n);
    HeadOut o{c.o.data() + r0 * d + h * dh, d, n, dh, w, &tl.o};
    float* o_at = o.out(ldo);
    ks.att_weights_rows(A, np, 0, n, V, ldv, w, o_at, ldo);
    o.done();
  });
}

// dq, dk, dv (into ws.dqkv, R x 3d) of the causal attention from the output gradient do (R x d), fused per
// (sequence, head) as the forward pass: dV = Aᵀ dO, dA = dO Vᵀ (lower triangle), dS = A (dA - rowsum) / sqrt(dh),
// dQ = dS K, dK = dSᵀ Q.
void attention_backward(const KernelSet& ks, SeqWorkspace& ws, const BlockCache& c, const float* dout,
                        int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, H = m.heads, dh = d / H, ld = 3 * d, w = round_up(dh, kAttWidth);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh)));
  parallel_for<true>(0, ws.B * H, n_threads, [&](std::int64_t task) {
    const index_t s = task / H, h = task % H;
    const index_t r0 = ws.seq_start[s], n = ws.seq_start[s + 1] - r0, np = round_up(n, kAttWidth);
    if (n == 0) return;
    thread_local AttTiles tl;
    const float* A = c.att.data() + ws.att_start[s] + h * n * np;
    const float* base = c.qkv.data() + r0 * ld + h * dh;
    index_t ldq, ldk, ldg, ldo;
    const float* Q = HeadRows{base, ld, n, dh, w, &tl.q}.in(ldq);
    const float* K = HeadRows{base + d, ld, n, dh, w, &tl.k}.in(ldk);
    const float* dO = HeadRows{dout + r0 * d + h * dh, d, n, dh, w, &tl.g}.in(ldg);
    float* dQ = ws.dqkv.data() + r0 * ld + h * dh;
    HeadOut dv{dQ + 2 * d, ld, n, dh, w, &tl.o};
    float* dv_at = dv.out(ldo);
    ks.att_weights_t_rows(A, np, 0, n, n, dO, ldg, w, dv_at, ldo);
    dv.done();
    tl.t.resize(static_cast<std::size_t>(w * np));
    ks.att_transpose(base + 2 * d, ld, n, dh, w, np, tl.t.data());
    tl.ds.resize(static_cast<std::size_t>(n * np));
    float* dS = tl.ds.data();
    ks.att_rows_cols(dO, ldg, 0, n, tl.t.data(), np, w, 1.0f, dS, np);
    for (index_t t = 0; t < n; ++t) {
      float* g = dS + t * np;
      const float* a = A + t * np;
      float dot;
      ks.dot_rows(g, np, 1, a, t + 1, 0.0f, &dot);
      for (index_t j = 0; j <= t; ++j) g[j] = a[j] * (g[j] - dot) * scale;
    }
    HeadOut dq{dQ, ld, n, dh, w, &tl.o};
    float* dq_at = dq.out(ldo);
    ks.att_weights_rows(dS, np, 0, n, K, ldk, w, dq_at, ldo);
    dq.done();
    HeadOut dk{dQ + d, ld, n, dh, w, &tl.o};
    float* dk_at = dk.out(ldo);
    ks.att_weights_t_rows(dS, np, 0, n, n, Q, ldq, w, dk_at, ldo);
    dk.done();
  });
}

// x (R x d) = the embedding sum of the batch's rows, dropout site 0 applied.
void embed(const KernelSet& ks, SeqWorkspace& ws, double dropout, std::uint64_t stream, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, L = m.max_len;
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  const float* P = m.position_table();
  if (dropout > 0.0) ws.mask0.resize(ws.R * d, ws.rows_cap * d);
  const DropoutSite site(stream, 0, dropout > 0.0 ? dropout : 0.0);
  for_rows(ws.R, n_threads, [&](index_t r0, index_t r1) {
    if (dropout > 0.0) site.rows(ks, ws.pos.data(), r0, r1, d, ws.mask0.data());
    for (index_t r = r0; r < r1; ++r) {
      const float* e = ws.vec(ws.items[r]);
      const float* p = P + (ws.pos[r] % L) * d;
      float* x = ws.x.data() + r * d;
      for (index_t c = 0; c < d; ++c) x[c] = e[c] * sqrt_d + p[c];
      if (dropout > 0.0) {
        const float* mk = ws.mask0.data() + r * d;
        for (index_t c = 0; c < d; ++c) x[c] *= mk[c];
      }
    }
  });
}

// q, k, v of block b for all rows: layer norm 1 of ws.x, then one product with Wq | Wk | Wv.
void qkv_forward(const KernelSet& ks, SeqWorkspace& ws, int b, BlockCache& c, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, R = ws.R;
  for (index_t i = 0; i < d; ++i)
    for (int k = 0; k < 3; ++k)
      std::memcpy(c.wcat.data() + i * 3 * d + k * d, m.block(b, kWq + 2 * k) + i * d, sizeof(float) * d);
  for (int k = 0; k < 3; ++k) std::memcpy(c.bcat.data() + k * d, m.block(b, kBq + 2 * k), sizeof(float) * d);
  ln_forward(ks, ws.x.data(), R, d, m.block(b, kLn1Gamma), m.block(b, kLn1Beta), ws.ones.data(), c.xhat1.data(),
             c.rstd1.data(), c.h1.data(), n_threads);
  Epilogue qkv;
  qkv.bias = c.bcat.data();
  dense_gemm(ks, ws, false, false, R, 3 * d, d, c.h1.data(), d, c.wcat.data(), 3 * d, c.qkv.data(), 3 * d, &qkv, n_threads);
}

// Block b on ws.x in place (cache c).
void block_forward(const KernelSet& ks, SeqWorkspace& ws, int b, BlockCache& c, double dropout,
                   std::uint64_t stream, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, R = ws.R, f = m.ffn[static_cast<std::size_t>(b)];
  resize_cache(c, ws, f, dropout > 0.0);
  qkv_forward(ks, ws, b, c, n_threads);
  attention_forward(ks, ws, c, n_threads);
  float* x = ws.x.data();
  float* t1 = ws.t1.data();
  // x += (A W + bias) * mask, the mask of dropout site `site`; without dropout the addend of the epilogue.
  auto add_residual = [&](const float* A, index_t k, const float* W, const float* bias, int site, float* mask) {
    Epilogue e;
    e.bias = bias;
    if (dropout > 0.0) {
      const DropoutSite drop(stream, site, dropout);
      // native bf16: the mask first, then x += (A W + bias) * mask in the product's registers (the same bits)
      if (ws.precision == SeqPrecision::Bf16Native) {
        for_rows(R, n_threads, [&](index_t r0, index_t r1) { drop.rows(ks, ws.pos.data(), r0, r1, d, mask); });
        if (bf16_gemm_rows_residual(ks, true, R, d, k, A, k, W, d, bias, mask, x, d, n_threads)) return;
      }
      dense_gemm(ks, ws, false, false, R, d, k, A, k, W, d, t1, d, &e, n_threads);
      for_rows(R, n_threads, [&](index_t r0, index_t r1) {
        drop.rows(ks, ws.pos.data(), r0, r1, d, mask);
        for (index_t i = r0 * d; i < r1 * d; ++i) x[i] += t1[i] * mask[i];
      });
    } else {
      e.addend = x;
      e.ld_addend = d;
      e.addend_scale = 1.0f;
      dense_gemm(ks, ws, false, false, R, d, k, A, k, W, d, t1, d, &e, n_threads);
      std::memcpy(x, t1, sizeof(float) * static_cast<std::size_t>(R * d));
    }
  };
  add_residual(c.o.data(), d, m.block(b, kWo), m.block(b, kBo), 1 + 2 * b, c.da.data());
  ln_forward(ks, x, R, d, m.block(b, kLn2Gamma), m.block(b, kLn2Beta), ws.ones.data(), c.xhat2.data(),
             c.rstd2.data(), c.h2.data(), n_threads);
  Epilogue hidden;
  hidden.bias = m.block(b, kB1);
  hidden.act = Activation::Relu;
  dense_gemm(ks, ws, false, false, R, f, d, c.h2.data(), d, m.block(b, kW1), f, c.u.data(), f, &hidden, n_threads);
  add_residual(c.u.data(), f, m.block(b, kW2), m.block(b, kB2), 2 + 2 * b, c.df.data());
}

// The whole forward pass of the prepared batch: ws.z (R x d). training: one cache per block (kept for
// backward); else one cache reused.
void forward_pass(const KernelSet& ks, SeqWorkspace& ws, bool training, double dropout, std::uint64_t stream,
                  int n_threads, bool stop_before_last = false) {
  const SeqModel& m = ws.m;
  const int n_blocks = m.n_blocks() - (stop_before_last ? 1 : 0);
  const std::size_t caches = static_cast<std::size_t>(training ? std::max(n_blocks, 1) : 1);
  if (ws.blocks.size() < caches) ws.blocks.resize(caches);  // never shrunk: kept for the next call
  embed(ks, ws, dropout, stream, n_threads);
  for (int b = 0; b < n_blocks; ++b)
    block_forward(ks, ws, b, ws.blocks[static_cast<std::size_t>(training ? b : 0)], dropout, stream, n_threads);
  if (stop_before_last) return;
  ln_forward(ks, ws.x.data(), ws.R, m.dim, m.final_gamma(), m.final_beta(), ws.ones.data(), ws.xhatf.data(),
             ws.rstdf.data(), ws.z.data(), n_threads);
}

// The BCE loss of the prepared, forwarded batch; fills ws.dz with dLoss/dz (rows), ws.dz_pad for active
// padding slots, the candidates' score gradients and the active positions' z in ws.src.
double loss_stage(const KernelSet& ks, SeqWorkspace& ws, const std::int32_t* targets, const std::int32_t* negatives,
                  index_t K, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, L = m.max_len, R = ws.R, C = 1 + K;
  ws.softmax = false;
  ws.active.clear();
  for (index_t i = 0; i < ws.B * L; ++i)
    if (targets[i] >= 0) ws.active.push_back(i);
  const index_t N = static_cast<index_t>(ws.active.size());
  ws.src.resize((R + N) * d, 2 * ws.rows_cap * d);
  ws.cand.resize(N * C * d, ws.rows_cap * C * d);
  ws.cand_ids.resize(static_cast<std::size_t>(N * C));
  ws.cand_g.resize(static_cast<std::size_t>(N * C));
  ws.pos_loss.resize(static_cast<std::size_t>(N));
  std::memset(ws.dz.resize(R * d, ws.rows_cap * d), 0, sizeof(float) * static_cast<std::size_t>(R * d));
  ws.dz_pad.clear();
  if (N == 0) return 0.0;
  ws.seq_ids.resize(static_cast<std::size_t>(C));
  for (index_t j = 0; j < C; ++j) ws.seq_ids[j] = static_cast<std::int32_t>(j);
  const float inv_n = 1.0f / static_cast<float>(N);
  for_rows(N, n_threads, [&](index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
      const index_t slot = ws.active[p], r = ws.row_of[slot];
      float* zp = ws.src.data() + (R + p) * d;
      std::memcpy(zp, r >= 0 ? ws.z.data() + r * d : m.final_beta(), sizeof(float) * static_cast<std::size_t>(d));
      std::int32_t* ids = ws.cand_ids.data() + p * C;
      ids[0] = targets[slot];
      for (index_t j = 0; j < K; ++j) ids[1 + j] = negatives[slot * K + j];
      float* cand = ws.cand.data() + p * C * d;
      for (index_t j = 0; j < C; ++j)
        std::memcpy(cand + j * d, ws.vec(ids[j]), sizeof(float) * static_cast<std::size_t>(d));
      float* g = ws.cand_g.data() + p * C;
      ks.dot_rows(cand, d, C, zp, d, 0.0f, g);  // scores, then their gradients in place
      double loss = 0.0;
      for (index_t j = 0; j < C; ++j) {
        const float s = g[j];
        loss += softplus(j == 0 ? -static_cast<double>(s) : static_cast<double>(s));
        g[j] = (j == 0 ? stable_sigmoid(s) - 1.0f : stable_sigmoid(s)) * inv_n;
      }
      ws.pos_loss[p] = loss;
      if (r >= 0) ks.row_sum(g, ws.seq_ids.data(), C, cand, d, d, ws.dz.data() + r * d);
    }
  });
  double loss = 0.0;
  for (index_t p = 0; p < N; ++p) {
    loss += ws.pos_loss[p];  // position order: the same sum for any thread count
    if (ws.row_of[ws.active[p]] < 0) {
      const std::size_t at = ws.dz_pad.size();
      ws.dz_pad.resize(at + static_cast<std::size_t>(d));
      ks.row_sum(ws.cand_g.data() + p * C, ws.seq_ids.data(), C, ws.cand.data() + p * C * d, d, d,
                 ws.dz_pad.data() + at);
    }
  }
  return loss / static_cast<double>(N);
}

// The sampled-softmax loss (reference.sequential_loss_and_gradients with negatives None): candidates are the
// batch's distinct targets (first-appearance order), logit = z . E[c] - log_q[c]; cross-entropy of each
// position's target, mean over positions. Fills ws.dz / dz_pad like loss_stage, the active positions' z in
// ws.src rows R.., and dLoss/dE of the candidates in ws.src rows R + N.. (entries of item_gradients).
// log_q: per item (none: no correction); or item_prob: log_q[c] = log(N item_prob[c]), the expected count of
// c among the batch's N targets.
double softmax_loss_stage(const KernelSet& ks, SeqWorkspace& ws, const std::int32_t* targets, const float* log_q,
                          const float* item_prob, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, L = m.max_len, R = ws.R;
  ws.softmax = true;
  ws.active.clear();
  for (index_t i = 0; i < ws.B * L; ++i)
    if (targets[i] >= 0) ws.active.push_back(i);
  const index_t N = static_cast<index_t>(ws.active.size());
  std::memset(ws.dz.resize(R * d, ws.rows_cap * d), 0, sizeof(float) * static_cast<std::size_t>(R * d));
  ws.dz_pad.clear();
  if (ws.slot.size() != static_cast<std::size_t>(m.n_items)) ws.slot.assign(static_cast<std::size_t>(m.n_items), -1);
  ws.cand_ids.clear();
  ws.target_col.resize(static_cast<std::size_t>(N));
  for (index_t p = 0; p < N; ++p) {
    const std::int32_t item = targets[ws.active[p]];
    std::int32_t& col = ws.slot[static_cast<std::size_t>(item)];
    if (col < 0) {
      col = static_cast<std::int32_t>(ws.cand_ids.size());
      ws.cand_ids.push_back(item);
    }
    ws.target_col[p] = col;
  }
  for (std::int32_t item : ws.cand_ids) ws.slot[static_cast<std::size_t>(item)] = -1;
  const index_t C = static_cast<index_t>(ws.cand_ids.size());
  ws.n_cand = C;
  float* src = ws.src.resize((R + N + C) * d, 3 * ws.rows_cap * d);
  ws.pos_loss.resize(static_cast<std::size_t>(N));
  if (N == 0) return 0.0;
  float* cand = ws.cand.resize(C * d, ws.rows_cap * d);
  ws.cand_bias.resize(static_cast<std::size_t>(C));
  for (index_t c = 0; c < C; ++c) {
    const index_t item = ws.cand_ids[c];
    std::memcpy(cand + c * d, ws.vec(static_cast<std::int32_t>(item)), sizeof(float) * static_cast<std::size_t>(d));
    ws.cand_bias[c] = log_q ? -log_q[item]
                      : item_prob ? -static_cast<float>(std::log(std::max(
                                        static_cast<double>(N) * item_prob[item], 1e-30)))
                                  : 0.0f;
  }
  float* zact = src + R * d;
  for_rows(N, n_threads, [&](index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
      const index_t r = ws.row_of[ws.active[p]];
      std::memcpy(zact + p * d, r >= 0 ? ws.z.data() + r * d : m.final_beta(), sizeof(float) * static_cast<std::size_t>(d));
    }
  });
  float* S = ws.scores.resize(N * C, 0);
  Epilogue logits;
  logits.bias = ws.cand_bias.data();
  sgemm(ks, false, true, N, C, d, zact, d, cand, d, S, C, &logits, n_threads);
  const float inv_n = 1.0f / static_cast<float>(N);
  for_rows(N, n_threads, [&](index_t p0, index_t p1) {
    for (index_t p = p0; p < p1; ++p) {
      float* row = S + p * C;
      const index_t y = ws.target_col[p];
      const float s_pos = row[y];
      float mx, sum;
      ks.exp_shift(row, C, &mx, &sum);
      ws.pos_loss[p] = std::log(static_cast<double>(sum)) + mx - s_pos;
      const float inv = 1.0f / sum;
      for (index_t c = 0; c < C; ++c) row[c] = row[c] * inv * inv_n;  // G = (P - onehot) / N
      row[y] -= inv_n;
    }
  });
  float* dzr = ws.dz_rows.resize(N * d, ws.rows_cap * d);
  sgemm(ks, false, false, N, d, C, S, C, cand, d, dzr, d, nullptr, n_threads);        // dz = G E[cand]
  sgemm(ks, true, false, C, d, N, S, C, zact, d, src + (R + N) * d, d, nullptr, n_threads);  // dE[cand] = Gᵀ z
  double loss = 0.0;
  for (index_t p = 0; p < N; ++p) {
    loss += ws.pos_loss[p];
    const index_t r = ws.row_of[ws.active[p]];
    if (r >= 0) {
      std::memcpy(ws.dz.data() + r * d, dzr + p * d, sizeof(float) * static_cast<std::size_t>(d));
    } else {
      ws.dz_pad.insert(ws.dz_pad.end(), dzr + p * d, dzr + (p + 1) * d);
    }
  }
  return loss / static_cast<double>(N);
}

float* grad_of(SeqWorkspace& ws, std::size_t i) { return ws.grad[i].data(); }

// The backward pass of block b: ws.dx from dLoss/d(block output) to dLoss/d(block input), its arrays'
// gradients into ws.grad.
void block_backward(const KernelSet& ks, SeqWorkspace& ws, int b, const BlockCache& c, bool dropout, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, R = ws.R, f = m.ffn[static_cast<std::size_t>(b)];
  auto g = [&](int k) { return grad_of(ws, SeqModel::block_index(b, k)); };
  float* dx = ws.dx.data();
  float* t1 = ws.t1.data();
  float* dh = ws.dh.data();
  float* big = ws.dbig.data();
  // feed-forward: x_out = x_mid + (relu(h2 W1 + b1) W2 + b2) * df
  const float* dfo = dx;
  if (dropout) {
    for_rows(R, n_threads, [&](index_t r0, index_t r1) {
      for (index_t i = r0 * d; i < r1 * d; ++i) t1[i] = dx[i] * c.df[i];
    });
    dfo = t1;
  }
  weight_gradient(ks, ws, f, d, R, c.u.data(), f, dfo, d, g(kW2), d, g(kB2), n_threads);
  Epilogue relu;
  relu.mul = c.u.data();
  relu.ld_mul = f;
  relu.mul_act = Activation::Relu;
  dense_gemm(ks, ws, false, true, R, f, d, dfo, d, m.block(b, kW2), d, big, f, &relu, n_threads);
  weight_gradient(ks, ws, d, f, R, c.h2.data(), d, big, f, g(kW1), f, g(kB1), n_threads);
  dense_gemm(ks, ws, false, true, R, d, f, big, f, m.block(b, kW1), f, dh, d, nullptr, n_threads);
  ln_backward(ks, ws.row_sum_ids, dh, m.block(b, kLn2Gamma), c.xhat2.data(), c.rstd2.data(), R, d, ws.ones.data(),
              ws.gscratch.data(), dx, g(kLn2Gamma), g(kLn2Beta), n_threads);
  // attention: x_mid = x_in + (o Wo + bo) * da
  const float* dao = dx;
  if (dropout) {
    for_rows(R, n_threads, [&](index_t r0, index_t r1) {
      for (index_t i = r0 * d; i < r1 * d; ++i) t1[i] = dx[i] * c.da[i];
    });
    dao = t1;
  }
  weight_gradient(ks, ws, d, d, R, c.o.data(), d, dao, d, g(kWo), d, g(kBo), n_threads);
  dense_gemm(ks, ws, false, true, R, d, d, dao, d, m.block(b, kWo), d, dh, d, nullptr, n_threads);  // dO
  attention_backward(ks, ws, c, dh, n_threads);
  float* dqkv = ws.dqkv.data();
  weight_gradient(ks, ws, d, 3 * d, R, c.h1.data(), d, dqkv, 3 * d, ws.gwcat.data(), 3 * d, ws.gbcat.data(), n_threads);
  dense_gemm(ks, ws, false, true, R, d, 3 * d, dqkv, 3 * d, c.wcat.data(), 3 * d, dh, d, nullptr, n_threads);
  ln_backward(ks, ws.row_sum_ids, dh, m.block(b, kLn1Gamma), c.xhat1.data(), c.rstd1.data(), R, d, ws.ones.data(),
              ws.gscratch.data(), dx, g(kLn1Gamma), g(kLn1Beta), n_threads);
  for (int k = 0; k < 3; ++k) {
    float* gw = g(kWq + 2 * k);
    for (index_t i = 0; i < d; ++i)
      std::memcpy(gw + i * d, ws.gwcat.data() + i * 3 * d + k * d, sizeof(float) * static_cast<std::size_t>(d));
    std::memcpy(g(kBq + 2 * k), ws.gbcat.data() + k * d, sizeof(float) * static_cast<std::size_t>(d));
  }
}

// The backward pass after loss_stage: every dense gradient into ws.grad, dx0 into ws.src's first R rows.
void backward_pass(const KernelSet& ks, SeqWorkspace& ws, bool dropout, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, R = ws.R, L = m.max_len;
  const index_t cap = ws.rows_cap;
  ws.grad.resize(m.n_arrays());
  for (std::size_t i = 1; i < m.n_arrays(); ++i) ws.grad[i].resize(static_cast<std::size_t>(m.size(i)));
  ws.dh.resize(R * d, cap * d);
  ws.dbig.resize(R * std::max(max_ffn(m), d), cap * std::max(max_ffn(m), d));
  ws.dqkv.resize(3 * R * d, 3 * cap * d);
  ws.gscratch.resize(R * d, cap * d);
  ws.row_sum_ids.fit(cap);
  ws.gwcat.resize(static_cast<std::size_t>(3 * d * d));
  ws.gbcat.resize(static_cast<std::size_t>(3 * d));
  // final layer norm, from dz into dx
  std::memset(ws.dx.resize(R * d, cap * d), 0, sizeof(float) * static_cast<std::size_t>(R * d));
  float* g_gamma = grad_of(ws, m.n_arrays() - 2);
  float* g_beta = grad_of(ws, m.n_arrays() - 1);
  ln_backward(ks, ws.row_sum_ids, ws.dz.data(), m.final_gamma(), ws.xhatf.data(), ws.rstdf.data(), R, d, ws.ones.data(),
              ws.gscratch.data(), ws.dx.data(), g_gamma, g_beta, n_threads);
  for (std::size_t at = 0; at < ws.dz_pad.size(); at += static_cast<std::size_t>(d))
    for (index_t c = 0; c < d; ++c) g_beta[c] += ws.dz_pad[at + c];
  for (int b = m.n_blocks() - 1; b >= 0; --b)
    block_backward(ks, ws, b, ws.blocks[static_cast<std::size_t>(b)], dropout, n_threads);
  // embedding: x = (E[s] sqrt(d) + P[t]) * mask0
  float* dx0 = ws.src.data();
  for_rows(R, n_threads, [&](index_t r0, index_t r1) {
    if (dropout)  // two loops: with the test inside, this one compiled scalar
      for (index_t i = r0 * d; i < r1 * d; ++i) dx0[i] = ws.dx[i] * ws.mask0[i];
    else
      std::memcpy(dx0 + r0 * d, ws.dx.data() + r0 * d, sizeof(float) * static_cast<std::size_t>((r1 - r0) * d));
  });
  float* gp = grad_of(ws, 1);
  parallel_for(0, L, R * d < (1 << 16) ? 1 : n_threads, [&](std::int64_t t) {
    float* row = gp + t * d;
    std::fill(row, row + d, 0.0f);
    for (index_t s = 0; s < ws.B; ++s) {
      const index_t r = ws.row_of[s * L + t];
      if (r < 0) continue;
      for (index_t c = 0; c < d; ++c) row[c] += dx0[r * d + c];
    }
  });
}

// The item rows' gradients (after backward_pass): entries (inputs, targets, negatives) grouped by item in
// order of first appearance, each group's gradient summed in entry order into ws.group_grad.
void item_gradients(const KernelSet& ks, SeqWorkspace& ws, index_t K, int n_threads) {
  const SeqModel& m = ws.m;
  const index_t d = m.dim, R = ws.R, N = static_cast<index_t>(ws.active.size()), C = 1 + K;
  if (ws.slot.size() != static_cast<std::size_t>(m.n_items)) ws.slot.assign(static_cast<std::size_t>(m.n_items), -1);
  const float sqrt_d = static_cast<float>(std::sqrt(static_cast<double>(d)));
  const index_t entries = ws.softmax ? R + ws.n_cand : R + N * C;
  ws.group_ids.clear();
  ws.entry_group.resize(static_cast<std::size_t>(entries));
  ws.entry_src.resize(static_cast<std::size_t>(entries));
  ws.entry_w.resize(static_cast<std::size_t>(entries));
  std::vector<std::int64_t>& count = ws.group_start;
  count.clear();
  auto add = [&](index_t e, std::int32_t item, std::int32_t src, float w) {
    std::int32_t& g = ws.slot[static_cast<std::size_t>(item)];
    if (g < 0) {
      g = static_cast<std::int32_t>(ws.group_ids.size());
      ws.group_ids.push_back(item);
      count.push_back(0);
    }
    ++count[static_cast<std::size_t>(g)];
    ws.entry_group[e] = g;
    ws.entry_src[e] = src;
    ws.entry_w[e] = w;
  };
  for (index_t r = 0; r < R; ++r) add(r, ws.items[r], static_cast<std::int32_t>(r), sqrt_d);
  if (ws.softmax) {  // each candidate's gradient row, already summed over positions
    for (index_t c = 0; c < ws.n_cand; ++c) add(R + c, ws.cand_ids[c], static_cast<std::int32_t>(R + N + c), 1.0f);
  } else {
    for (index_t p = 0; p < N; ++p)
      for (index_t j = 0; j < C; ++j)
        add(R + p * C + j, ws.cand_ids[p * C + j], static_cast<std::int32_t>(R + p), ws.cand_g[p * C + j]);
  }
  const std::size_t G = ws.group_ids.size();
  for (std::int32_t item : ws.group_ids) ws.slot[static_cast<std::size_t>(item)] = -1;
  // counts -> starts; then place each entry after its group's earlier ones
  std::int64_t total = 0;
  for (std::size_t g = 0; g < G; ++g) {
    const std::int64_t c = count[g];
    count[g] = total;
    total += c;
  }
  count.push_back(total);
  std::vector<std::int64_t> cursor(count.begin(), count.end() - 1);
  ws.grouped_src.resize(static_cast<std::size_t>(entries));
  ws.grouped_w.resize(static_cast<std::size_t>(entries));
  for (index_t e = 0; e < entries; ++e) {
    const std::int64_t at = cursor[static_cast<std::size_t>(ws.entry_group[e])]++;
    ws.grouped_src[at] = ws.entry_src[e];
    ws.grouped_w[at] = ws.entry_w[e];
  }
  ws.group_grad.resize(static_cast<index_t>(G) * d, ws.rows_cap * (2 + std::max<index_t>(K, 1)) * d);
  parallel_for(0, static_cast<std::int64_t>(G), entries * d < (1 << 16) ? 1 : n_threads, [&](std::int64_t g) {
    const std::int64_t s = count[g];
    ks.row_sum(ws.grouped_w.data() + s, ws.grouped_src.data() + s, count[g + 1] - s, ws.src.data(), d, d,
               ws.group_grad.data() + g * d);
  });
}

// Item features: the feature rows' gradients from the item vectors' (ws.group_grad, after item_gradients):
// dF[f] = sum over the batch's items i (group order) and their entries k with f_k = f of w_k dV[i], grouped
// by feature row in order of first appearance into ws.fgroup_ids / ws.fgroup_grad (fixed order: the same
// bits for any n_threads).
void feature_gradients(const KernelSet& ks, SeqWorkspace& ws, int n_threads) {
  const SeqModel& m = ws.m;
  const SeqItemFeatures& f = m.features;
  const index_t d = m.dim;
  if (ws.fslot.size() != static_cast<std::size_t>(f.n_features))
    ws.fslot.assign(static_cast<std::size_t>(f.n_features), -1);
  ws.fgroup_ids.clear();
  ws.fentry_group.clear();
  ws.fentry_src.clear();
  ws.fentry_w.clear();
  std::vector<std::int64_t>& count = ws.fgroup_start;
  count.clear();
  for (std::size_t g = 0; g < ws.group_ids.size(); ++g) {
    const std::int32_t item = ws.group_ids[g];
    for (std::int64_t k = f.indptr[item]; k < f.indptr[item + 1]; ++k) {
      std::int32_t& fg = ws.fslot[static_cast<std::size_t>(f.ids[k])];
      if (fg < 0) {
        fg = static_cast<std::int32_t>(ws.fgroup_ids.size());
        ws.fgroup_ids.push_back(f.ids[k]);
        count.push_back(0);
      }
      ++count[static_cast<std::size_t>(fg)];
      ws.fentry_group.push_back(fg);
      ws.fentry_src.push_back(static_cast<std::int32_t>(g));
      ws.fentry_w.push_back(f.weights[k]);
    }
  }
  for (std::int32_t id : ws.fgroup_ids) ws.fslot[static_cast<std::size_t>(id)] = -1;
  const std::size_t G = ws.fgroup_ids.size(), entries = ws.fentry_group.size();
  std::int64_t total = 0;
  for (std::size_t g = 0; g < G; ++g) {
    const std::int64_t c = count[g];
    count[g] = total;
    total += c;
  }
  count.push_back(total);
  std::vector<std::int64_t> cursor(count.begin(), count.end() - 1);
  ws.fgrouped_src.resize(entries);
  ws.fgrouped_w.resize(entries);
  for (std::size_t e = 0; e < entries; ++e) {
    const std::int64_t at = cursor[static_cast<std::size_t>(ws.fentry_group[e])]++;
    ws.fgrouped_src[static_cast<std::size_t>(at)] = ws.fentry_src[e];
    ws.fgrouped_w[static_cast<std::size_t>(at)] = ws.fentry_w[e];
  }
  ws.fgroup_grad.resize(static_cast<index_t>(G) * d, static_cast<index_t>(G) * d);
  parallel_for(0, static_cast<std::int64_t>(G), static_cast<index_t>(entries) * d < (1 << 16) ? 1 : n_threads,
               [&](std::int64_t g) {
                 const std::int64_t s = count[g];
                 ks.row_sum(ws.fgrouped_w.data() + s, ws.fgrouped_src.data() + s, count[g + 1] - s,
                            ws.group_grad.data(), d, d, ws.fgroup_grad.data() + g * d);
               });
}

// forward + loss + backward + item gradients of one batch; returns the loss (backward skipped when it is
// not finite and skip_if_not_finite).
// softmax: the sampled softmax (log_q or item_prob: its correction, see softmax_loss_stage), else BCE.
double batch_gradients(const KernelSet& ks, SeqWorkspace& ws, const std::int32_t* seqs, const std::int32_t* targets,
                       const std::int32_t* negatives, index_t B, index_t K, double dropout, std::uint64_t stream,
                       bool skip_if_not_finite, int n_threads, bool softmax = false, const float* log_q = nullptr,
                       const float* item_prob = nullptr) {
  prepare(ws, seqs, B);
  batch_composites(ws, targets, softmax ? nullptr : negatives, K, n_threads);
  forward_pass(ks, ws, true, dropout, stream, n_threads);
  const double loss = softmax ? softmax_loss_stage(ks, ws, targets, log_q, item_prob, n_threads)
                              : loss_stage(ks, ws, targets, negatives, K, n_threads);
  if (skip_if_not_finite && !std::isfinite(loss)) return loss;
  backward_pass(ks, ws, dropout > 0.0, n_threads);
  item_gradients(ks, ws, K, n_threads);
  if (ws.m.features.on()) feature_gradients(ks, ws, n_threads);
  return loss;
}

void update_array(const KernelSet& ks, const UpdateRule& rule, float* p, const float* g, float* s1, float* s2,
                  index_t len, int n_threads) {
  constexpr index_t kChunk = 4096;
  const index_t chunks = (len + kChunk - 1) / kChunk;
  parallel_for(0, chunks, len < (1 << 16) ? 1 : n_threads, [&](std::int64_t c) {
    const index_t begin = c * kChunk, count = std::min(kChunk, len - begin);
    ks.update(rule, p + begin, g + begin, s1 ? s1 + begin : nullptr, s2 ? s2 + begin : nullptr, count);
  });
}

}  // namespace

namespace {

// The last block and the final norm for one row per sequence in `seqs` (its last row), after
// forward_pass(..., stop_before_last): k, v for every row, everything else for those rows only; their z into
// ws.z rows 0, 1, ... The same arithmetic per row as the full pass (sgemm's chains do not depend on M, nor
// the attention kernels' on the rows a call covers), so the same bits.
void last_rows_forward(const KernelSet& ks, SeqWorkspace& ws, const std::vector<index_t>& seqs, int n_threads) {
  const SeqModel& m = ws.m;
  const int b = m.n_blocks() - 1;
  const index_t d = m.dim, H = m.heads, dh = d / H, ld = 3 * d, f = m.ffn[static_cast<std::size_t>(b)];
  const index_t Q = static_cast<index_t>(seqs.size());
  BlockCache& c = ws.blocks[0];
  resize_cache(c, ws, f, false);
  qkv_forward(ks, ws, b, c, n_threads);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh)));
  float* o = c.o.data();     // rows 0..Q-1: the attention outputs of the selected rows
  float* xq = c.h2.data();   // their block inputs, then (rows Q..2Q-1 of t1) their x_mid
  parallel_for<true>(0, Q * H, n_threads, [&](std::int64_t task) {
    const index_t q = task / H, h = task % H, s = seqs[static_cast<std::size_t>(q)];
    const index_t r0 = ws.seq_start[s], n = ws.seq_start[s + 1] - r0;
    const index_t np = round_up(n, kAttWidth), w = round_up(dh, kAttWidth);
    thread_local AttTiles tl;
    tl.ds.resize(static_cast<std::size_t>(np));
    const float* base = c.qkv.data() + r0 * ld + h * dh;
    index_t ldq, ldv, ldo;
    const float* Qs = HeadRows{base, ld, n, dh, w, &tl.q}.in(ldq);
    const float* V = HeadRows{base + 2 * d, ld, n, dh, w, &tl.v}.in(ldv);
    tl.t.resize(static_cast<std::size_t>(w * np));
    ks.att_transpose(base + d, ld, n, dh, w, np, tl.t.data());
    // row n - 1 alone, as in attention_forward (leading dimensions 0: the one row sits at the pointers)
    float* row = tl.ds.data();
    ks.att_rows_cols(Qs + (n - 1) * ldq, 0, n - 1, n, tl.t.data(), np, w, scale, row, 0);
    causal_softmax(ks, row, 0, n - 1, n);
    HeadOut out1{o + q * d + h * dh, d, 1, dh, w, &tl.o};
    float* out1_at = out1.out(ldo);
    ks.att_weights_rows(row, 0, n - 1, n, V, ldv, w, out1_at, 0);
    out1.done();
    if (h == 0)
      std::memcpy(xq + q * d, ws.x.data() + (r0 + n - 1) * d, sizeof(float) * static_cast<std::size_t>(d));
  });
  float* mid = ws.t1.data();
  Epilogue out;
  out.bias = m.block(b, kBo);
  out.addend = xq;
  out.ld_addend = d;
  out.addend_scale = 1.0f;
  dense_gemm(ks, ws, false, false, Q, d, d, o, d, m.block(b, kWo), d, mid, d, &out, n_threads);
  ln_forward(ks, mid, Q, d, m.block(b, kLn2Gamma), m.block(b, kLn2Beta), ws.ones.data(), c.xhat2.data(),
             c.rstd2.data(), xq, n_threads);
  Epilogue hidden;
  hidden.bias = m.block(b, kB1);
  hidden.act = Activation::Relu;
  dense_gemm(ks, ws, false, false, Q, f, d, xq, d, m.block(b, kW1), f, c.u.data(), f, &hidden, n_threads);
  Epilogue ffn;
  ffn.bias = m.block(b, kB2);
  ffn.addend = mid;
  ffn.ld_addend = d;
  ffn.addend_scale = 1.0f;
  dense_gemm(ks, ws, false, false, Q, d, f, c.u.data(), f, m.block(b, kW2), d, ws.x.data(), d, &ffn, n_threads);
  ln_forward(ks, ws.x.data(), Q, d, m.final_gamma(), m.final_beta(), ws.ones.data(), ws.xhatf.data(),
             ws.rstdf.data(), ws.z.data(), n_threads);
}

}  // namespace

SeqScratch::SeqScratch(const SeqModel& model) : ws_(new SeqWorkspace(model)) {}
SeqScratch::~SeqScratch() = default;

void seq_forward(const KernelSet& ks, const SeqModel& m, const std::int32_t* seqs, index_t B, bool last_only,
                 float* out, int n_threads, SeqScratch* scratch) {
  std::unique_ptr<SeqWorkspace> own(scratch ? nullptr : new SeqWorkspace(m));
  SeqWorkspace& ws = scratch ? scratch->get() : *own;
  ws.precision = SeqPrecision::Float32;  // scoring is float32 whatever the training precision
  const index_t d = m.dim, L = m.max_len;
  const index_t chunk = std::max<index_t>(1, kForwardRows / L);
  for (index_t s0 = 0; s0 < B; s0 += chunk) {
    const index_t n = std::min(chunk, B - s0);
    prepare(ws, seqs + s0 * L, n);
    batch_composites(ws, nullptr, nullptr, 0, n_threads);
    if (last_only && m.n_blocks() > 0) {  // the last block only for the rows the output needs
      forward_pass(ks, ws, false, 0.0, 0, n_threads, true);
      std::vector<index_t> wanted;
      for (index_t s = 0; s < n; ++s)
        if (ws.row_of[s * L + L - 1] >= 0) wanted.push_back(s);
      last_rows_forward(ks, ws, wanted, n_threads);
      float* o = out + s0 * d;
      for (index_t s = 0, q = 0; s < n; ++s) {
        const bool event = ws.row_of[s * L + L - 1] >= 0;
        std::memcpy(o + s * d, event ? ws.z.data() + (q++) * d : m.final_beta(),
                    sizeof(float) * static_cast<std::size_t>(d));
      }
      continue;
    }
    forward_pass(ks, ws, false, 0.0, 0, n_threads);
    const index_t slots = last_only ? n : n * L;
    float* o = out + (last_only ? s0 : s0 * L) * d;
    for (index_t i = 0; i < slots; ++i) {
      const index_t slot = last_only ? i * L + L - 1 : i;
      const index_t r = ws.row_of[slot];
      std::memcpy(o + i * d, r >= 0 ? ws.z.data() + r * d : m.final_beta(), sizeof(float) * static_cast<std::size_t>(d));
    }
  }
}

double seq_loss_and_gradients(const KernelSet& ks, const SeqModel& m, const std::int32_t* seqs,
                              const std::int32_t* targets, const std::int32_t* negatives, index_t B, index_t K,
                              double dropout, std::uint64_t stream, const std::vector<float*>& grads, int n_threads,
                              const float* log_q, float* feature_grad, SeqPrecision precision) {
  SeqWorkspace ws(m);
  ws.precision = precision;
  const double loss =
      batch_gradients(ks, ws, seqs, targets, negatives, B, K, dropout, stream, false, n_threads, !negatives, log_q);
  for (std::size_t i = 1; i < m.n_arrays(); ++i)
    std::memcpy(grads[i], ws.grad[i].data(), sizeof(float) * static_cast<std::size_t>(m.size(i)));
  const index_t d = m.dim;
  std::memset(grads[0], 0, sizeof(float) * static_cast<std::size_t>(m.n_items * d));
  for (std::size_t g = 0; g < ws.group_ids.size(); ++g)
    if (!m.features.id_frozen(ws.group_ids[g]))
      std::memcpy(grads[0] + static_cast<index_t>(ws.group_ids[g]) * d, ws.group_grad.data() + g * d,
                  sizeof(float) * static_cast<std::size_t>(d));
  if (m.features.on() && feature_grad) {
    std::memset(feature_grad, 0, sizeof(float) * static_cast<std::size_t>(m.features.n_features * d));
    for (std::size_t g = 0; g < ws.fgroup_ids.size(); ++g)
      std::memcpy(feature_grad + static_cast<index_t>(ws.fgroup_ids[g]) * d, ws.fgroup_grad.data() + g * d,
                  sizeof(float) * static_cast<std::size_t>(d));
  }
  return loss;
}

index_t seq_batch(const SeqModel& m, const SeqHistories& h, const SeqTraining& t, const std::int64_t* users, index_t n,
                  std::uint64_t epoch, std::uint64_t batch_index, std::int32_t* seqs, std::int32_t* targets,
                  std::int32_t* negatives, std::uint64_t* dropout_stream) {
  const index_t L = m.max_len, K = t.negatives;
  std::fill(seqs, seqs + n * L, -1);
  std::fill(targets, targets + n * L, -1);
  std::fill(negatives, negatives + n * L * K, -1);
  // One random stream per (seed, epoch, batch): the same negatives and dropout whatever n_threads.
  std::uint64_t stream = t.sampler.seed ^ (epoch * kGolden);
  stream = splitmix64(stream) ^ batch_index;
  std::uint64_t rng = splitmix64(stream);
  *dropout_stream = splitmix64(stream);
  index_t positions = 0;
  for (index_t i = 0; i < n; ++i) {
    const std::int64_t u = users[i];
    const std::int64_t end = h.indptr[u + 1];
    const index_t take = std::min<index_t>(end - h.indptr[u], L + 1);
    if (take < 2) continue;
    const std::int64_t start = end - take;
    const index_t cnt = take - 1, slot0 = L - cnt;
    for (index_t j = 0; j < cnt; ++j) {
      seqs[i * L + slot0 + j] = h.items[start + j];
      targets[i * L + slot0 + j] = h.items[start + j + 1];
    }
    positions += cnt;
    for (index_t s = slot0; s < L; ++s)
      for (index_t j = 0; j < K; ++j)
        negatives[(i * L + s) * K + j] = draw_negative(t.sampler, static_cast<std::int32_t>(u), rng);
  }
  return positions;
}

EpochResult seq_train_epoch(const KernelSet& ks, SeqModel& m, const SeqTraining& t, Optimizer& opt,
                            const SeqHistories& h, const std::int64_t* order, index_t n_order, index_t batch_size,
                            double dropout, std::uint64_t epoch, const StopCheck& stop, int n_threads,
                            SeqScratch* scratch, float* feature_state1, float* feature_state2,
                            SeqPrecision precision) {
  const index_t L = m.max_len, K = t.softmax ? 0 : t.negatives, d = m.dim;
  const index_t n_max = std::min(batch_size, n_order);
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(n_max * L)), targets(seqs.size()),
      negatives(seqs.size() * static_cast<std::size_t>(K));
  std::unique_ptr<SeqWorkspace> own(scratch ? nullptr : new SeqWorkspace(m));
  SeqWorkspace& ws = scratch ? scratch->get() : *own;
  ws.precision = precision;
  EpochResult result;
  BatchThreads batch_threads(n_threads);
  SeqTraining t_batch = t;
  t_batch.negatives = static_cast<int>(K);
  std::uint64_t batch_index = 0;
  for (index_t begin = 0; begin < n_order; begin += batch_size, ++batch_index) {
    if (stop && stop(begin)) break;
    const index_t n = std::min(batch_size, n_order - begin);
    std::uint64_t dropout_stream = 0;
    const index_t positions = seq_batch(m, h, t_batch, order + begin, n, epoch, batch_index, seqs.data(), targets.data(),
                                        negatives.data(), &dropout_stream);
    if (positions == 0) continue;  // nothing to learn from: no step
    const int threads = batch_threads.next();
    const double loss =
        batch_gradients(ks, ws, seqs.data(), targets.data(), negatives.data(), n, K, dropout, dropout_stream, true,
                        threads, t.softmax, nullptr, t.item_prob);
    const std::int64_t step_before = opt.adam_t;
    UpdateRule rule = opt.next_step();
    if (opt.solver != Solver::Adam) rule.kind = UpdateKind::PlainSgd;
    const bool adam = rule.kind == UpdateKind::Adam;
    const bool skipped = !std::isfinite(loss);  // before any update: the parameters keep the last finite step
    if (!skipped) {
      for (std::size_t i = 1; i < m.n_arrays(); ++i)
        update_array(ks, rule, m.arrays[i], ws.grad[i].data(), adam ? opt.state1[i] : nullptr,
                     adam ? opt.state2[i] : nullptr, m.size(i), threads);
      float* E = m.item_table();
      const std::int64_t G = static_cast<std::int64_t>(ws.group_ids.size());
      parallel_for(0, G, G * d < (1 << 16) ? 1 : threads, [&](std::int64_t g) {
        if (m.features.id_frozen(ws.group_ids[g])) return;  // an item known only by its features
        const index_t row = static_cast<index_t>(ws.group_ids[g]) * d;
        ks.update(rule, E + row, ws.group_grad.data() + g * d, adam ? opt.state1[0] + row : nullptr,
                  adam ? opt.state2[0] + row : nullptr, d);
      });
      if (m.features.on()) {  // lazy Adam on the feature rows the batch's items read
        float* F = m.features.table;
        const std::int64_t FG = static_cast<std::int64_t>(ws.fgroup_ids.size());
        parallel_for(0, FG, FG * d < (1 << 16) ? 1 : threads, [&](std::int64_t g) {
          const index_t row = static_cast<index_t>(ws.fgroup_ids[g]) * d;
          ks.update(rule, F + row, ws.fgroup_grad.data() + g * d, adam ? feature_state1 + row : nullptr,
                    adam ? feature_state2 + row : nullptr, d);
        });
      }
    }
    if (!end_batch(result, opt, step_before, skipped, loss, positions)) break;
    batch_threads.done(positions);
  }
  return result;
}

void seq_bf16_weight_gradient(const KernelSet& ks, bool native, index_t M, index_t N, index_t K, const float* X,
                              index_t ldx, const float* dY, index_t ldy, float* C, index_t ldc, float* col_sums,
                              int n_threads) {
#ifdef FASTREC_HAVE_BF16_KERNELS
  if (native && M > 0 && N > 0 && K > 0) {
    require(bf16_native_available(), "bf16_gemm: the AVX512-BF16 kernel is not available on this CPU");
    // bf16_gemm's K blocks, so bf16_gemm's sums
    const index_t kc_step = bf16_kc_step(K, bf16_kernels_avx512().kc);
    const index_t pairs = (std::min(kc_step, K) + 1) / 2;
    // Threads take slices of C's wider side (each element's sum is the same whatever the slice), each converting
    // its own columns of X and dY; at least ~1 M multiply-adds per thread.
    const double fmas = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    const bool by_cols = N >= M;
    const index_t unit = by_cols ? 16 : 6, units = ceil_div(by_cols ? N : M, unit);
    const int threads = static_cast<int>(std::min<double>(
        {static_cast<double>(resolve_threads(n_threads)), std::max(1.0, fmas / (1 << 20)), static_cast<double>(units)}));
    const index_t step = ceil_div(units, threads) * unit;
    parallel_for(0, threads, threads, [&](std::int64_t t) {
      const index_t lo = t * step, hi = std::min(by_cols ? N : M, lo + step);
      if (lo >= hi) return;
      const index_t m = by_cols ? M : hi - lo, n = by_cols ? hi - lo : N;
      thread_local AlignedBuffer xs, ys;
      auto* xbuf = reinterpret_cast<std::uint32_t*>(xs.get(static_cast<std::size_t>(pairs * ceil_div(m, 16) * 16)));
      auto* ybuf =
          reinterpret_cast<std::uint32_t*>(ys.get(static_cast<std::size_t>((pairs + 1) * ceil_div(n, 16) * 16)));
      if (by_cols)  // each slice its columns' sums; by rows, the first slice all of them
        seq_bf16_weight_gradient_avx512(K, kc_step, X, ldx, dY + lo, ldy, C + lo, ldc, m, n, xbuf, ybuf,
                                        col_sums ? col_sums + lo : nullptr);
      else
        seq_bf16_weight_gradient_avx512(K, kc_step, X + lo, ldx, dY, ldy, C + lo * ldc, ldc, m, n, xbuf, ybuf,
                                        t == 0 ? col_sums : nullptr);
    });
    return;
  }
#endif
  bf16_gemm(ks, native, true, false, M, N, K, X, ldx, dY, ldy, C, ldc, nullptr, n_threads);
  if (!col_sums) return;
  RowSumIds rs;
  rs.fit(K);
  column_sums(ks, rs, dY, ldy, K, N, col_sums, n_threads);
}

}  // namespace fastrec
