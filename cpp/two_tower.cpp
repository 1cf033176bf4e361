#include "two_tower.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "gemm.h"
#include "parallel.h"

namespace fastrec {

namespace {

// Rows per chunk of tower_vectors: bounds the workspace, still a full-speed GEMM.
constexpr index_t kVectorChunk = 2048;
// Norms below this are treated as this (a zero vector stays zero instead of dividing by zero).
constexpr float kMinNorm = 1e-12f;

// Rows per task of the per-row loops around the softmax GEMMs (normalisation, gradient fix-ups).
constexpr index_t kRowsPerTask = 64;

// Sixteen partial sums (element j into lane j mod 16), added in a fixed tree: one order whatever the batch or
// the thread, and vectorisable (one latency-bound chain took 0.2 ms per 1024-row batch of normalisations).
float dot(const float* a, const float* b, index_t d) {
  float acc[16] = {};
  index_t j = 0;
  for (; j + 16 <= d; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  for (int l = 0; j < d; ++j, ++l) acc[l] += a[j] * b[j];
  for (int w = 8; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// log(1 + e^x) without overflow.
double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

// Rows of raw (n x d) normalised into out with their norms, or copied.
void normalize_rows(const float* raw, index_t n, index_t d, bool normalize, float* out, float* norms,
                    int n_threads) {
  if (!normalize) {
    std::memcpy(out, raw, sizeof(float) * static_cast<std::size_t>(n * d));
    return;
  }
  parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, n_threads, [&](std::int64_t task) {
    for (index_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
      const float* x = raw + r * d;
      float* y = out + r * d;
      const float norm = std::max(std::sqrt(dot(x, x, d)), kMinNorm);
      norms[r] = norm;
      for (index_t j = 0; j < d; ++j) y[j] = x[j] / norm;
    }
  });
}

// g (n x d): the gradient with respect to the normalised rows y = x / |x| turned into the gradient with
// respect to x, (g - y <y, g>) / |x|, written to out.
void normalize_backward(const float* y, const float* norms, const float* g, index_t n, index_t d, bool normalize,
                        float* out, int n_threads) {
  if (!normalize) {
    std::memcpy(out, g, sizeof(float) * static_cast<std::size_t>(n * d));
    return;
  }
  parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, n_threads, [&](std::int64_t task) {
    for (index_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
      const float* gr = g + r * d;
      float* o = out + r * d;
      const float* yr = y + r * d;
      const float c = dot(yr, gr, d);
      for (index_t j = 0; j < d; ++j) o[j] = (gr[j] - yr[j] * c) / norms[r];
    }
  });
}

// The two towers' passes and the buffers of one batch.
struct TowerBatch {
  TowerPass user, item;
  std::vector<std::int32_t> users, items;  // tower keys: items holds the positives, then the negatives
  std::vector<float> y, weight;
  std::vector<float> u, v, u_norm, v_norm;  // the (normalised) vectors and their norms
  std::vector<float> du, dv;                // dLoss/d(u, v) times n
  std::vector<float> scores;                // Softmax: n x candidates
  std::vector<float> correction;            // Softmax: minus each candidate's log-Q term
  std::vector<std::pair<std::int32_t, std::int32_t>> runs;  // Softmax: (item, candidate) sorted
  std::vector<std::pair<index_t, index_t>> run_of;          // Softmax: each positive's run in `runs`
  std::vector<float> shifted;               // Softmax, fixed shift: the correction minus the shift
  std::vector<float> tile_sums;             // Softmax, fixed shift: row sums of e^logit per GEMM tile
  std::vector<float> row_scale, u_scaled;   // Softmax, fixed shift: G's row factors; U's rows times them
  std::vector<double> row_loss;

  TowerBatch(const TwoTowerModel& m, index_t n_pos, index_t n_item_rows, bool training)
      : user(m.user, n_pos, training), item(m.item, n_item_rows, training) {}
};

// The in-batch softmax of batch_loss with every logit shifted by `shift`, an upper bound of the logits (see
// there): b.row_loss and b.du, b.dv = dLoss/d(u, v) times n, from b.u, b.v, b.correction and the hit runs.
// G = diag(s) E - diag(w / t) on the positives' columns, with E = e^(logit - shift) (accidental hits 0) and
// s_r = w_r / (t sum_r E), so dU = diag(s) (E V) - diag(w / t) V[:n] and dV = Eᵀ (diag(s) U) - the same on
// U's rows: E is never rescaled.
void softmax_fixed_shift(const KernelSet& ks, TowerBatch& b, index_t n, index_t c_count, index_t ld, index_t d,
                         float inv_t, float shift, int n_threads) {
  const float* u = b.u.data();
  const float* v = b.v.data();
  float* E = b.scores.data();
  b.shifted.resize(static_cast<std::size_t>(c_count));
  for (index_t c = 0; c < c_count; ++c) b.shifted[c] = b.correction[c] - shift;
  const index_t groups = (c_count + ks.nr - 1) / ks.nr;
  b.tile_sums.assign(static_cast<std::size_t>(n * groups), 0.0f);
  Epilogue exps;  // E = e^(S / t + correction - shift), each tile's row sums on the side
  exps.scale = inv_t;
  exps.bias = b.shifted.data();
  exps.exp_sums = b.tile_sums.data();
  exps.ld_sums = groups;
  exps.sums_width = ks.nr;
  sgemm(ks, false, true, n, c_count, d, u, d, v, d, E, ld, &exps, n_threads);
  b.row_scale.resize(static_cast<std::size_t>(n));
  b.u_scaled.resize(static_cast<std::size_t>(n * d));
  const float* weights = b.weight.empty() ? nullptr : b.weight.data();
  const index_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(0, tasks, n_threads, [&](std::int64_t task) {
    for (index_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
      float* row = E + r * ld;
      float* sums = b.tile_sums.data() + r * groups;
      const auto [h0, h1] = b.run_of[r];
      bool hits = false;
      for (index_t h = h0; h < h1; ++h)  // accidental hits: not negatives
        if (b.runs[h].second != r) row[b.runs[h].second] = 0.0f, hits = true;
      if (hits)  // the hits' tiles summed again, in column order
        for (index_t h = h0; h < h1; ++h) {
          const index_t g = b.runs[h].second / ks.nr;
          if (b.runs[h].second == r) continue;
          float sum = 0.0f;
          for (index_t c = g * ks.nr; c < std::min(c_count, (g + 1) * ks.nr); ++c) sum += row[c];
          sums[g] = sum;
        }
      float sum = 0.0f;
      for (index_t g = 0; g < groups; ++g) sum += sums[g];
      const float w = weights ? weights[r] : 1.0f;
      // -log softmax of the positive = log(sum) - log(E_rr), E_rr = e^(z_pos - shift) >= e^-kMaxExpRange
      b.row_loss[r] = w * (std::log(static_cast<double>(sum)) - std::log(static_cast<double>(row[r])));
      const float s = w * inv_t / sum;
      b.row_scale[r] = s;
      for (index_t j = 0; j < d; ++j) b.u_scaled[r * d + j] = s * u[r * d + j];
    }
  });
  float* du = b.du.data();
  float* dv = b.dv.data();
  sgemm(ks, false, false, n, d, c_count, E, ld, v, d, du, d, nullptr, n_threads);
  sgemm(ks, true, false, c_count, d, n, E, ld, b.u_scaled.data(), d, dv, d, nullptr, n_threads);
  parallel_for(0, tasks, n_threads, [&](std::int64_t task) {
    for (index_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
      const float s = b.row_scale[r], wt = (weights ? weights[r] : 1.0f) * inv_t;
      for (index_t j = 0; j < d; ++j) {
        du[r * d + j] = s * du[r * d + j] - wt * v[r * d + j];
        dv[r * d + j] -= wt * u[r * d + j];
      }
    }
  });
}

// The batch's data loss (mean over its n positives' examples; see TowerTraining) and, in the towers'
// output_gradient(), dLoss/d(output) times n. The batch's users, items (positives then `negatives`), y and
// weight are in b. dropout: the towers' dropout streams when training.
double batch_loss(const KernelSet& ks, const TwoTowerModel& m, const TowerTraining& t, index_t n, index_t n_neg,
                  TowerBatch& b, const std::uint64_t* dropout, int n_threads) {
  const index_t d = m.dim(), n_items = n + n_neg;
  const float inv_t = 1.0f / m.temperature;
  const float* raw_u = b.user.forward(ks, b.users.data(), n, dropout, n_threads);
  const float* raw_v = b.item.forward(ks, b.items.data(), n_items, dropout ? dropout + 1 : nullptr, n_threads);
  b.u.resize(static_cast<std::size_t>(n * d));
  b.v.resize(static_cast<std::size_t>(n_items * d));
  b.u_norm.resize(static_cast<std::size_t>(n));
  b.v_norm.resize(static_cast<std::size_t>(n_items));
  normalize_rows(raw_u, n, d, m.normalize, b.u.data(), b.u_norm.data(), n_threads);
  normalize_rows(raw_v, n_items, d, m.normalize, b.v.data(), b.v_norm.data(), n_threads);
  // Softmax writes every element through its GEMMs; the other losses add into zeros.
  if (t.loss == TowerLoss::Softmax) {
    b.du.resize(static_cast<std::size_t>(n * d));
    b.dv.resize(static_cast<std::size_t>(n_items * d));
  } else {
    b.du.assign(static_cast<std::size_t>(n * d), 0.0f);
    b.dv.assign(static_cast<std::size_t>(n_items * d), 0.0f);
  }
  b.row_loss.assign(static_cast<std::size_t>(n), 0.0);
  const float* u = b.u.data();
  const float* v = b.v.data();
  float* du = b.du.data();
  float* dv = b.dv.data();
  auto weight = [&](index_t r) { return b.weight.empty() ? 1.0f : b.weight[r]; };
  double denominator = static_cast<double>(n);  // of the mean loss
  if (t.loss == TowerLoss::Softmax) {
    const index_t c_count = n_items;
    // Rows of S one cache line longer than a multiple of 64 bytes: at 1024 candidates (4 KiB) the GEMMs'
    // 12-row tiles and kc-row panels would otherwise map onto one set of the L1 cache.
    const index_t ld = (c_count + 15) / 16 * 16 + 16;
    b.scores.resize(static_cast<std::size_t>(n * ld));
    float* S = b.scores.data();
    b.correction.assign(static_cast<std::size_t>(c_count), 0.0f);
    if (t.item_prob) {
      const double extra = static_cast<double>(n_neg) / static_cast<double>(t.sampler.n_items);
      for (index_t c = 0; c < c_count; ++c)
        b.correction[c] = -static_cast<float>(
            std::log(std::max(static_cast<double>(n) * t.item_prob[b.items[c]] + extra, 1e-30)));
    }
    // Candidates holding the same item, as runs of (item, column) sorted: a positive's accidental hits are the
    // other columns of its run.
    b.runs.resize(static_cast<std::size_t>(c_count));
    for (index_t c = 0; c < c_count; ++c) b.runs[c] = {b.items[c], static_cast<std::int32_t>(c)};
    std::sort(b.runs.begin(), b.runs.end());
    b.run_of.resize(static_cast<std::size_t>(n));
    for (index_t g = 0; g < c_count;) {
      index_t end = g + 1;
      while (end < c_count && b.runs[end].first == b.runs[g].first) ++end;
      for (index_t h = g; h < end; ++h)
        if (b.runs[h].second < n) b.run_of[b.runs[h].second] = {g, end};
      g = end;
    }
    // With normalised vectors every logit lies within [-1/t + min correction, 1/t + max correction], so the
    // softmax can subtract that upper bound instead of each row's maximum (e^x stays finite and, when the
    // range is under kMaxExpRange, above float's smallest normal): the exponentials then come out of the
    // logits GEMM's epilogue while each tile is in L1, and G's row factors are applied to the 1024 x 64 sides
    // of dU = G V and dV = Gᵀ U instead of to the n x candidates matrix. Otherwise, the row maximum.
    constexpr float kMaxExpRange = 60.0f;
    float lo = 0.0f, hi = 0.0f;
    for (index_t c = 0; c < c_count; ++c) {
      lo = c == 0 ? b.correction[c] : std::min(lo, b.correction[c]);
      hi = c == 0 ? b.correction[c] : std::max(hi, b.correction[c]);
    }
    if (m.normalize && 2.0f * inv_t + (hi - lo) <= kMaxExpRange) {
      softmax_fixed_shift(ks, b, n, c_count, ld, d, inv_t, inv_t + hi, n_threads);
    } else {
      // Logits straight from the GEMM's epilogue: S = U Vᵀ / temperature - log-Q correction of each column.
      Epilogue logits;
      logits.scale = inv_t;
      logits.bias = b.correction.data();
      sgemm(ks, false, true, n, c_count, d, u, d, v, d, S, ld, &logits, n_threads);
      parallel_for(0, n, n_threads, [&](std::int64_t r) {
        float* row = S + r * ld;
        for (index_t h = b.run_of[r].first; h < b.run_of[r].second; ++h)  // accidental hits: not negatives
          if (b.runs[h].second != r) row[b.runs[h].second] = -INFINITY;
        const float z_pos = row[r];
        float zmax, sum;
        ks.exp_shift(row, c_count, &zmax, &sum);
        const float w = weight(r);
        b.row_loss[r] = w * (std::log(static_cast<double>(sum)) + zmax - z_pos);
        // G = w (softmax - onehot) / temperature, in place of the logits
        const float scale = w * inv_t / sum;
        for (index_t c = 0; c < c_count; ++c) row[c] *= scale;
        row[r] -= w * inv_t;
      });
      sgemm(ks, false, false, n, d, c_count, S, ld, v, d, du, d, nullptr, n_threads);
      sgemm(ks, true, false, c_count, d, n, S, ld, u, d, dv, d, nullptr, n_threads);
    }
  } else if (t.loss == TowerLoss::Bpr) {
    const index_t k = t.negatives;
    denominator = static_cast<double>(n * k);
    parallel_for(0, n, n_threads, [&](std::int64_t r) {
      const float* ur = u + r * d;
      const float* vp = v + r * d;
      const float sp = dot(ur, vp, d) * inv_t, w = weight(r);
      double loss = 0.0;
      for (index_t j = 0; j < k; ++j) {
        const index_t c = n + r * k + j;
        const float* vc = v + c * d;
        const float x = sp - dot(ur, vc, d) * inv_t;
        loss += w * softplus(-static_cast<double>(x));
        const float g = -w * stable_sigmoid(-x) * inv_t;  // dLoss/dx times the denominator, / temperature
        for (index_t q = 0; q < d; ++q) {
          du[r * d + q] += g * (vp[q] - vc[q]);
          dv[r * d + q] += g * ur[q];
          dv[c * d + q] = -g * ur[q];
        }
      }
      b.row_loss[r] = loss;
    });
  } else if (t.loss == TowerLoss::Bce) {
    const index_t k = t.negatives;
    denominator = static_cast<double>(n * (1 + k));
    parallel_for(0, n, n_threads, [&](std::int64_t r) {
      const float* ur = u + r * d;
      double loss = 0.0;
      for (index_t j = -1; j < k; ++j) {  // the positive, then its negatives
        const index_t c = j < 0 ? r : n + r * k + j;
        const float y = j < 0 ? 1.0f : 0.0f, w = j < 0 ? weight(r) : 1.0f;
        const float* vc = v + c * d;
        const float s = dot(ur, vc, d) * inv_t;
        loss += w * (softplus(static_cast<double>(s)) - static_cast<double>(y) * s);
        const float g = w * (stable_sigmoid(s) - y) * inv_t;
        for (index_t q = 0; q < d; ++q) {
          du[r * d + q] += g * vc[q];
          dv[c * d + q] = g * ur[q];
        }
      }
      b.row_loss[r] = loss;
    });
  } else {  // Mse
    parallel_for(0, n, n_threads, [&](std::int64_t r) {
      const float* ur = u + r * d;
      const float* vr = v + r * d;
      const float s = dot(ur, vr, d) * inv_t, w = weight(r), e = s - b.y[r];
      b.row_loss[r] = 0.5 * w * static_cast<double>(e) * e;
      const float g = w * e * inv_t;
      for (index_t q = 0; q < d; ++q) {
        du[r * d + q] = g * vr[q];
        dv[r * d + q] = g * ur[q];
      }
    });
  }
  double loss = 0.0;
  for (double l : b.row_loss) loss += l;  // row order: the same sum for any thread count
  // du, dv are dLoss/d(u, v) times `denominator`; the towers' backward passes take them times n.
  const float rescale = static_cast<float>(static_cast<double>(n) / denominator);
  if (rescale != 1.0f) {
    for (float& g : b.du) g *= rescale;
    for (float& g : b.dv) g *= rescale;
  }
  normalize_backward(u, b.u_norm.data(), du, n, d, m.normalize, b.user.output_gradient(), n_threads);
  normalize_backward(v, b.v_norm.data(), dv, n_items, d, m.normalize, b.item.output_gradient(), n_threads);
  return loss / denominator;
}

// Copies example rows order[0:n] into the batch.
void gather_pairs(const TowerPairs& p, const std::int64_t* order, index_t n, TowerBatch& b) {
  b.users.resize(static_cast<std::size_t>(n));
  b.items.resize(static_cast<std::size_t>(n));
  b.y.resize(static_cast<std::size_t>(n));
  for (index_t r = 0; r < n; ++r) {
    const index_t e = order ? order[r] : r;
    b.users[r] = p.users[e];
    b.items[r] = p.items[e];
    b.y[r] = p.y ? p.y[e] : 0.0f;
  }
  b.weight.clear();
  if (p.weight) {
    b.weight.resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) b.weight[r] = p.weight[order ? order[r] : r];
  }
}

// Appends the batch's negative items: `negatives` uniform items (Softmax) or `negatives` per positive drawn by
// the sampler (Bpr, Bce). Returns their count.
index_t append_negatives(const TowerTraining& t, index_t n, std::uint64_t stream, TowerBatch& b) {
  if (t.loss == TowerLoss::Mse || t.negatives <= 0) return 0;
  std::uint64_t rng = stream;
  if (t.loss == TowerLoss::Softmax) {
    NegativeSampler uniform;
    uniform.n_items = t.sampler.n_items;
    for (int j = 0; j < t.negatives; ++j) b.items.push_back(draw_negative(uniform, 0, rng));
    return t.negatives;
  }
  for (index_t r = 0; r < n; ++r)
    for (int j = 0; j < t.negatives; ++j) b.items.push_back(draw_negative(t.sampler, b.users[r], rng));
  return n * t.negatives;
}

index_t max_item_rows(const TowerTraining& t, index_t n) {
  if (t.loss == TowerLoss::Softmax) return n + std::max(t.negatives, 0);
  if (t.loss == TowerLoss::Mse) return n;
  return n * (1 + std::max(t.negatives, 0));
}

}  // namespace

void validate(const TwoTowerModel& m) {
  require(m.user.tower && m.item.tower, "both towers must be built as towers");
  validate(m.user);
  validate(m.item);
  require(m.user.mlp.layers.back().fan_out == m.item.mlp.layers.back().fan_out,
          "the user and item towers must end in vectors of the same width");
  require(std::isfinite(m.temperature) && m.temperature > 0.0f, "temperature must be a positive number");
}

void validate(const TwoTowerModel& m, const TowerPairs& p) {
  Examples users, items;
  users.keys = {p.users};
  items.keys = {p.items};
  users.rows = items.rows = p.rows;
  validate(m.user, users);
  validate(m.item, items);
}

void tower_vectors(const KernelSet& ks, const TwoTowerModel& m, bool user_side, const std::int32_t* keys, index_t n,
                   float scale, float* out, int n_threads) {
  const FieldModel& tower = user_side ? m.user : m.item;
  const index_t d = m.dim();
  TowerPass pass(tower, std::min(n, kVectorChunk), false);
  std::vector<float> norms(static_cast<std::size_t>(std::min(n, kVectorChunk)));
  for (index_t r0 = 0; r0 < n; r0 += kVectorChunk) {
    const index_t rows = std::min(kVectorChunk, n - r0);
    const float* raw = pass.forward(ks, keys + r0, rows, nullptr, n_threads);
    float* o = out + r0 * d;
    normalize_rows(raw, rows, d, m.normalize, o, norms.data(), n_threads);
    if (scale != 1.0f)
      for (index_t i = 0; i < rows * d; ++i) o[i] *= scale;
  }
}

namespace {

// Copies a tower's field gradients into dense tables (zero outside touched rows).
TowerPass::FieldSink copy_fields(const FieldModel& tower, const std::vector<float*>& tables) {
  return [&tower, &tables](std::size_t i, const TouchedRows& touched, const float* G, int) {
    const index_t d = tower.fields[i].dim;
    std::memset(tables[i], 0, sizeof(float) * static_cast<std::size_t>(tower.fields[i].vocab * d));
    for (std::size_t g = 0; g < touched.ids.size(); ++g)
      std::memcpy(tables[i] + static_cast<index_t>(touched.ids[g]) * d, G + g * d,
                  sizeof(float) * static_cast<std::size_t>(d));
  };
}

}  // namespace

double two_tower_loss_and_gradients(const KernelSet& ks, const TwoTowerModel& m, const TowerTraining& t,
                                    const TowerPairs& p, const std::int32_t* negatives, index_t n_negatives,
                                    float alpha, const TowerGradients& ug, const TowerGradients& ig, int n_threads) {
  const index_t n = p.rows;
  TowerBatch b(m, n, n + n_negatives, true);
  gather_pairs(p, nullptr, n, b);
  b.items.insert(b.items.end(), negatives, negatives + n_negatives);
  double loss = batch_loss(ks, m, t, n, n_negatives, b, nullptr, n_threads);
  CopySink us(m.user.mlp, ug.coefs, ug.intercepts), is(m.item.mlp, ig.coefs, ig.intercepts);
  loss += b.user.backward(ks, alpha, static_cast<double>(n), us, copy_fields(m.user, ug.tables), n_threads);
  loss += b.item.backward(ks, alpha, static_cast<double>(n), is, copy_fields(m.item, ig.tables), n_threads);
  return loss;
}

EpochResult two_tower_train_epoch(const KernelSet& ks, TwoTowerModel& m, const TowerTraining& t, Optimizer& opt_user,
                                  Optimizer& opt_item, const TowerPairs& p, const std::int64_t* order, index_t n_order,
                                  index_t batch_size, float alpha, std::uint64_t epoch, const StopCheck& stop,
                                  int n_threads) {
  const index_t n_max = std::min(batch_size, n_order);
  TowerBatch b(m, n_max, max_item_rows(t, n_max), true);
  EpochResult result;
  BatchThreads batch_threads(n_threads);
  std::uint64_t batch_index = 0;
  for (index_t begin = 0; begin < n_order; begin += batch_size, ++batch_index) {
    if (stop && stop(begin)) break;
    const int threads = batch_threads.next();
    const index_t n = std::min(batch_size, n_order - begin);
    gather_pairs(p, order + begin, n, b);
    // One random stream per (seed, epoch, batch): the same negatives and dropout whatever n_threads.
    std::uint64_t stream = t.sampler.seed ^ (epoch * 0x9e3779b97f4a7c15ULL);
    stream = splitmix64(stream) ^ batch_index;
    const index_t n_neg = append_negatives(t, n, splitmix64(stream), b);
    const std::uint64_t dropout[2] = {splitmix64(stream), splitmix64(stream)};
    double loss = batch_loss(ks, m, t, n, n_neg, b, dropout, threads);
    const std::int64_t step_before = opt_user.adam_t;
    const UpdateRule rule = opt_user.next_step();
    opt_item.adam_t = opt_user.adam_t;
    const bool skipped = !std::isfinite(loss);  // before any update: the parameters keep the last finite step
    if (!skipped) {
      const UpdateRule row_rule = embedding_rule(rule);
      auto rows_update = [&](FieldModel& tower) -> TowerPass::FieldSink {
        return [&ks, &row_rule, &tower](std::size_t i, const TouchedRows& touched, const float* G, int threads_f) {
          EmbeddingField& f = tower.fields[i];
          update_touched_rows(ks, row_rule, touched, f.table, f.dim, G, f.state1, f.state2, threads_f);
          mark_touched(f, touched);
        };
      };
      UpdateSink us(ks, m.user.mlp, opt_user, rule), is(ks, m.item.mlp, opt_item, rule);
      loss += b.user.backward(ks, alpha, static_cast<double>(n), us, rows_update(m.user), threads);
      loss += b.item.backward(ks, alpha, static_cast<double>(n), is, rows_update(m.item), threads);
    }
    const bool ok = end_batch(result, opt_user, step_before, skipped, loss, n);
    opt_item.adam_t = opt_user.adam_t;
    if (!ok) break;
    batch_threads.done(n);
  }
  return result;
}

}  // namespace fastrec
