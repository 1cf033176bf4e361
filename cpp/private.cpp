// DP-SGD for the field model (private.h; docs/DESIGN.md, "Differential privacy (issue 16)").
//
// Ghost norms: every per-example gradient is linear in that example's output gradient, and each weight
// gradient is an outer product summed over examples, so example r's squared gradient norm is
//   sum over layers (||a_r||^2 + 1) ||delta_r||^2        (weights: the outer product's norm; +1: the bias)
// + sum over embedding fields ||u_r||^2 sum_j w_j^2    (u_r: the field's upstream gradient; w_j: the summed
//                                                      weight of each distinct row j in the bag)
// + delta_r^2 ||pu_r * pv_r||^2                        (the GMF weight vector)
// all read from one backward pass. Scaling row r's deltas, upstream gradients and GMF term by c_r then gives
// the clipped gradients through the same products.
#include "private.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <unordered_set>

#include "gemm.h"
#include "parallel.h"
#include "sparse.h"

namespace fastrec {

namespace {

// splitmix64's finaliser: a bijection of 64-bit words whose outputs pass BigCrush as a counter-based stream.
inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The rows of unit (positive) p: p itself, then its negatives.
struct Units {
  index_t n_pos = 0;
  int negatives = 0;
  index_t rows() const { return n_pos * (1 + negatives); }
};

// Buffers of one private step.
struct StepBuffers {
  std::vector<double> squares;  // per row
  std::vector<float> scale;     // c_r
  std::vector<std::vector<float>> deltas;  // clipped deltas per layer
  std::vector<float> grad;      // one parameter's gradient
  std::vector<float> upstream;  // a field's clipped upstream gradient (rows x dim)
  TouchedRows touched, selected;
  std::vector<float> rows_grad, selected_grad;
  std::vector<double> row_squares, counts, sums;
  std::vector<std::int32_t> unit_ids, group_touched;
  std::vector<std::vector<std::int32_t>> group_selected;  // per field: its group's selected rows
};

double sum_squares(const float* x, index_t n) {
  double s = 0.0;
  for (index_t j = 0; j < n; ++j) s += static_cast<double>(x[j]) * x[j];
  return s;
}

// sum_j (summed weight of distinct row j)^2 over bag row r.
double bag_weight_squares(const CsrView& bags, index_t r, std::vector<std::pair<std::int32_t, float>>& scratch) {
  const index_t p0 = bags.indptr[r], p1 = bags.indptr[r + 1];
  if (p1 - p0 == 1) return static_cast<double>(bags.data[p0]) * bags.data[p0];
  scratch.clear();
  for (index_t p = p0; p < p1; ++p) scratch.emplace_back(bags.indices[p], bags.data[p]);
  std::sort(scratch.begin(), scratch.end());
  double s = 0.0;
  for (std::size_t a = 0; a < scratch.size();) {
    double w = 0.0;
    std::size_t b = a;
    for (; b < scratch.size() && scratch[b].first == scratch[a].first; ++b) w += scratch[b].second;
    s += w * w;
    a = b;
  }
  return s;
}

// Each row's squared gradient norm (ghost norms, see the top of this file).
void row_norm_squares(const FieldModel& m, const FieldBatchPass& pass, std::vector<double>& out, int n_threads) {
  const index_t n = pass.rows();
  const std::size_t L = m.mlp.layers.size();
  out.assign(static_cast<std::size_t>(n), 0.0);
  const float* D = pass.delta(L - 1);
  parallel_for(0, n, n_threads, [&](std::int64_t r) {
    std::vector<std::pair<std::int32_t, float>> scratch;
    double s = 0.0;
    for (std::size_t l = 0; l < L; ++l) {
      const Layer& layer = m.mlp.layers[l];
      const double a = sum_squares(pass.layer_input(l) + r * pass.layer_input_ld(l), layer.fan_in);
      s += (a + 1.0) * sum_squares(pass.delta(l) + r * layer.fan_out, layer.fan_out);
    }
    for (std::size_t i = 0; i < m.fields.size(); ++i) {
      const EmbeddingField& f = m.fields[i];
      double u;
      if (f.offset >= 0) {
        u = sum_squares(pass.dx() + r * m.width + f.offset, f.dim);
      } else if (f.wide) {
        u = static_cast<double>(D[r]) * D[r];
      } else {
        u = sum_squares(pass.gmf_delta(static_cast<int>(i) == m.gmf.field_u ? 0 : 1) + r * f.dim, f.dim);
      }
      if (u != 0.0) s += u * bag_weight_squares(pass.bags(i), r, scratch);
    }
    if (m.gmf.field_u >= 0) {
      const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
      const float *pu = pass.gmf_pooled(0) + r * d, *pv = pass.gmf_pooled(1) + r * d;
      double g = 0.0;
      for (index_t j = 0; j < d; ++j) {
        const double x = static_cast<double>(pu[j]) * pv[j];
        g += x * x;
      }
      s += static_cast<double>(D[r]) * D[r] * g;
    }
    out[static_cast<std::size_t>(r)] = s;
  });
}

float clip_scale(double squares, double bound) {
  return squares > bound * bound ? static_cast<float>(bound / std::sqrt(squares)) : 1.0f;
}

// Adds the noise and the L2 term, divides by the denominator, in place: g[k] = (g[k] + sigma C z_k + alpha
// p[k]) / den; z_k = normal_at(seed, step, stream, k). Elements split over threads in fixed chunks.
void noise_in_place(const PrivacySettings& ps, std::uint64_t step, std::uint64_t stream, float* g, const float* p,
                    float alpha, double den, index_t len, int n_threads) {
  const double std_dev = ps.noise_multiplier * ps.max_grad_norm;
  constexpr index_t kChunk = 4096;  // even: a chunk holds whole pairs of normals
  const index_t chunks = (len + kChunk - 1) / kChunk;
  parallel_for(0, chunks, chunks > 1 ? n_threads : 1, [&](std::int64_t c) {
    double z[2];
    for (index_t k = c * kChunk; k < std::min(len, (c + 1) * kChunk); ++k) {
      if ((k & 1) == 0) normal_pair(ps.seed, step, stream, static_cast<std::uint64_t>(k) >> 1, z);
      double v = g[k] + std_dev * z[k & 1];
      if (alpha != 0.0f && p) v += static_cast<double>(alpha) * p[k];
      g[k] = static_cast<float>(v / den);
    }
  });
}

// The rows of the tables of group `group` (fields i with count_group[i] == group) to update this step, sorted,
// into sel. "sparse": DP-AdaFEST's thresholded noisy contribution counts; "dense": every row.
void select_rows(const FieldModel& m, int group, const FieldBatchPass* pass, const Units& units,
                 const PrivacySettings& ps, std::uint64_t step, StepBuffers& b, std::vector<std::int32_t>& sel) {
  const index_t vocab = m.fields[static_cast<std::size_t>(group)].vocab;
  sel.clear();
  if (!ps.sparse) {
    sel.resize(static_cast<std::size_t>(vocab));
    for (index_t j = 0; j < vocab; ++j) sel[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(j);
    return;
  }
  std::vector<std::size_t> members;
  for (std::size_t i = 0; i < m.fields.size(); ++i)
    if (ps.count_group[i] == group) members.push_back(i);
  // The rows the batch reads in any table of the group, and their contribution counts: each unit (a
  // positive and its negatives) adds 1 / sqrt(k) to each of the k distinct rows it reads, so that its
  // contribution vector has L2 norm 1 (the count mechanism's sensitivity).
  std::vector<std::int32_t>& touched = b.group_touched;
  touched.clear();
  if (pass)
    for (std::size_t i : members) {
      const CsrView bags = pass->bags(i);
      touched.insert(touched.end(), bags.indices, bags.indices + bags.indptr[bags.rows]);
    }
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  b.counts.assign(touched.size(), 0.0);
  for (index_t p = 0; pass && p < units.n_pos; ++p) {
    b.unit_ids.clear();
    for (std::size_t i : members) {
      const CsrView bags = pass->bags(i);
      for (int j = -1; j < units.negatives; ++j) {
        const index_t r = j < 0 ? p : units.n_pos + p * units.negatives + j;
        b.unit_ids.insert(b.unit_ids.end(), bags.indices + bags.indptr[r], bags.indices + bags.indptr[r + 1]);
      }
    }
    std::sort(b.unit_ids.begin(), b.unit_ids.end());
    b.unit_ids.erase(std::unique(b.unit_ids.begin(), b.unit_ids.end()), b.unit_ids.end());
    const double w = 1.0 / std::sqrt(static_cast<double>(b.unit_ids.size()));
    for (std::int32_t id : b.unit_ids)
      b.counts[static_cast<std::size_t>(std::lower_bound(touched.begin(), touched.end(), id) - touched.begin())] += w;
  }
  const std::uint64_t count_stream = kStreamFieldCount + static_cast<std::uint64_t>(group);
  auto above = [&](double count, std::int32_t id) {
    return count + ps.count_noise * normal_at(ps.seed, step, count_stream, static_cast<std::uint64_t>(id)) >
           ps.threshold;
  };
  const auto n_touched = static_cast<index_t>(touched.size());
  const index_t untouched = vocab - n_touched;
  // Rows outside the batch have count 0: each passes with p = P(N(0, sigma1^2) > tau). A small table draws
  // them one by one; a large one draws how many pass (Binomial(untouched, p)) and which (uniformly among the
  // untouched rows): the same distribution, at a cost that follows the rows selected, not the table.
  constexpr index_t kDirectRows = 1 << 16;
  if (untouched <= kDirectRows) {
    std::size_t g = 0;
    for (index_t j = 0; j < vocab; ++j) {
      const auto id = static_cast<std::int32_t>(j);
      const bool in_batch = g < touched.size() && touched[g] == id;
      if (above(in_batch ? b.counts[g] : 0.0, id)) sel.push_back(id);
      if (in_batch) ++g;
    }
    return;
  }
  for (std::size_t g = 0; g < touched.size(); ++g)
    if (above(b.counts[g], touched[g])) sel.push_back(touched[g]);
  const double p_pass = 0.5 * std::erfc(ps.threshold / (ps.count_noise * std::sqrt(2.0)));
  std::uint64_t rng = noise_key(ps.seed, step, kStreamFalsePositive + static_cast<std::uint64_t>(group), 0);
  const std::int64_t k = binomial_draw(untouched, p_pass, rng);
  std::unordered_set<std::int32_t> chosen;
  chosen.reserve(static_cast<std::size_t>(k) * 2);
  while (static_cast<std::int64_t>(chosen.size()) < k) {
    const auto id = static_cast<std::int32_t>(
        std::min<index_t>(static_cast<index_t>(uniform01(rng) * static_cast<double>(vocab)), vocab - 1));
    if (std::binary_search(touched.begin(), touched.end(), id)) continue;
    chosen.insert(id);
  }
  sel.insert(sel.end(), chosen.begin(), chosen.end());
  std::sort(sel.begin(), sel.end());
}

// One private step's gradients and updates, from a batch pass (nullptr: an empty sample, noise only).
void private_update(const KernelSet& ks, FieldModel& m, Optimizer& opt, const FieldBatchPass* pass,
                    const Units& units, const PrivacySettings& ps, float alpha, double den, std::uint64_t step,
                    StepBuffers& b, int n_threads) {
  const std::size_t L = m.mlp.layers.size();
  const index_t n = pass ? pass->rows() : 0;
  const double bound = ps.max_grad_norm / (1.0 + units.negatives);
  if (pass) {
    row_norm_squares(m, *pass, b.squares, n_threads);
    b.scale.resize(static_cast<std::size_t>(n));
    for (index_t r = 0; r < n; ++r) b.scale[static_cast<std::size_t>(r)] = clip_scale(b.squares[static_cast<std::size_t>(r)], bound);
  }
  const UpdateRule rule = opt.next_step();
  const UpdateRule row_rule = embedding_rule(rule);
  const float* c = b.scale.data();
  // MLP: dW = A^T (c * D), db = sum of c * D over rows (in row order), then noise, L2 and the update.
  b.deltas.resize(L);
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = m.mlp.layers[l];
    const index_t fi = layer.fan_in, fo = layer.fan_out;
    std::vector<float>& Dc = b.deltas[l];
    Dc.resize(static_cast<std::size_t>(n * fo));
    for (index_t r = 0; r < n; ++r)
      for (index_t j = 0; j < fo; ++j) Dc[r * fo + j] = c[r] * pass->delta(l)[r * fo + j];
    b.grad.assign(static_cast<std::size_t>(fi * fo), 0.0f);
    if (n > 0)
      sgemm(ks, true, false, fi, fo, n, pass->layer_input(l), pass->layer_input_ld(l), Dc.data(), fo, b.grad.data(), fo,
            nullptr, n_threads);
    noise_in_place(ps, step, l, b.grad.data(), layer.W, alpha, den, fi * fo, n_threads);
    update_dense(ks, rule, layer.W, b.grad.data(), opt.state1[l], l < opt.state2.size() ? opt.state2[l] : nullptr,
                 fi * fo, n_threads);
    b.sums.assign(static_cast<std::size_t>(fo), 0.0);  // rows in order: the same sum for any n_threads
    for (index_t r = 0; r < n; ++r)
      for (index_t j = 0; j < fo; ++j) b.sums[static_cast<std::size_t>(j)] += Dc[r * fo + j];
    b.grad.resize(static_cast<std::size_t>(fo));
    for (index_t j = 0; j < fo; ++j) b.grad[static_cast<std::size_t>(j)] = static_cast<float>(b.sums[static_cast<std::size_t>(j)]);
    noise_in_place(ps, step, L + l, b.grad.data(), nullptr, 0.0f, den, fo, 1);
    update_dense(ks, rule, layer.b, b.grad.data(), opt.state1[L + l],
                 L + l < opt.state2.size() ? opt.state2[L + l] : nullptr, fo, 1);
  }
  const float* D = n > 0 ? pass->delta(L - 1) : nullptr;
  // The GMF weights: sum of c_r D_r (pu_r * pv_r), read before the tables change.
  if (m.gmf.field_u >= 0) {
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
    std::vector<double> s(static_cast<std::size_t>(d), 0.0);
    for (index_t r = 0; r < n; ++r) {
      const float *pu = pass->gmf_pooled(0) + r * d, *pv = pass->gmf_pooled(1) + r * d;
      for (index_t j = 0; j < d; ++j) s[static_cast<std::size_t>(j)] += static_cast<double>(c[r] * D[r]) * pu[j] * pv[j];
    }
    b.grad.resize(static_cast<std::size_t>(d));
    for (index_t j = 0; j < d; ++j) b.grad[static_cast<std::size_t>(j)] = static_cast<float>(s[static_cast<std::size_t>(j)]);
    noise_in_place(ps, step, kStreamGmf, b.grad.data(), m.gmf.w, alpha, den, d, 1);
    update_dense(ks, rule, m.gmf.w, b.grad.data(), m.gmf.state1, m.gmf.state2, d, 1);
  }
  // Embedding tables: the clipped upstream gradients scattered to the batch's rows, then the selected rows'
  // noised gradients (zero sum for a selected row outside the batch) and their update.
  const double std_dev = ps.noise_multiplier * ps.max_grad_norm;
  b.group_selected.resize(m.fields.size());
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    EmbeddingField& f = m.fields[i];
    const index_t dim = f.dim;
    b.touched.ids.clear();
    if (pass) {
      b.upstream.resize(static_cast<std::size_t>(n * dim));
      for (index_t r = 0; r < n; ++r) {
        const float* u = f.offset >= 0 ? pass->dx() + r * m.width + f.offset
                         : f.wide      ? D + r
                                       : pass->gmf_delta(static_cast<int>(i) == m.gmf.field_u ? 0 : 1) + r * dim;
        for (index_t j = 0; j < dim; ++j) b.upstream[r * dim + j] = c[r] * u[j];
      }
      group_by_column(pass->bags(i), b.touched);
      b.rows_grad.resize(b.touched.ids.size() * static_cast<std::size_t>(dim));
      touched_rows_gradient(ks, b.touched, b.upstream.data(), dim, f.table, dim, 0.0f, 1.0f, b.rows_grad.data(),
                            b.row_squares, n_threads);
    }
    const int group = ps.count_group[i];
    if (group == static_cast<int>(i)) select_rows(m, group, pass, units, ps, step, b, b.group_selected[i]);
    b.selected.ids = b.group_selected[static_cast<std::size_t>(group)];
    const std::vector<std::int32_t>& sel = b.selected.ids;
    const std::vector<std::int32_t>& touched = b.touched.ids;
    const float alpha_f = f.alpha >= 0.0f ? f.alpha : alpha;
    b.selected_grad.resize(sel.size() * static_cast<std::size_t>(dim));
    const std::uint64_t stream = kStreamFieldGrad + i;
    parallel_for(0, static_cast<std::int64_t>(sel.size()), sel.size() * dim < 16384 ? 1 : n_threads, [&](std::int64_t s) {
      const std::int32_t id = sel[static_cast<std::size_t>(s)];
      const auto at = std::lower_bound(touched.begin(), touched.end(), id);
      const float* sum = at != touched.end() && *at == id ? b.rows_grad.data() + (at - touched.begin()) * dim : nullptr;
      const float* row = f.table + static_cast<index_t>(id) * dim;
      float* g = b.selected_grad.data() + s * dim;
      double z[2];
      for (index_t j = 0; j < dim; ++j) {
        const std::uint64_t k = static_cast<std::uint64_t>(id) * dim + j;
        if (j == 0 || (k & 1) == 0) normal_pair(ps.seed, step, stream, k >> 1, z);
        double v = (sum ? sum[j] : 0.0) + std_dev * z[k & 1] + static_cast<double>(alpha_f) * row[j];
        g[j] = static_cast<float>(v / den);
      }
    });
    update_touched_rows(ks, row_rule, b.selected, f.table, dim, b.selected_grad.data(), f.state1, f.state2, n_threads);
  }
}

}  // namespace

void check_count_groups(const FieldModel& m, const PrivacySettings& ps) {
  require(ps.count_group.size() == m.fields.size(), "count_group needs one entry per field");
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    const int g = ps.count_group[i];
    require(g >= 0 && g <= static_cast<int>(i) && ps.count_group[static_cast<std::size_t>(g)] == g,
            "count_group[i] must name a field at or before i that is its own group");
    const EmbeddingField &f = m.fields[i], &h = m.fields[static_cast<std::size_t>(g)];
    require(f.vocab == h.vocab && f.bags.indptr == h.bags.indptr,
            "fields of one count group must read the same bag table (same vocabulary)");
  }
}

std::uint64_t noise_key(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t index) {
  return mix64(mix64(mix64(mix64(seed) ^ step) ^ stream) ^ index);
}

double normal_at(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t index) {
  // Box-Muller on two uniforms of the pair's key (u1 in (0, 1], u2 in [0, 1)): indices 2k and 2k + 1 are the
  // pair's cosine and sine, two independent standard normals from one logarithm.
  const std::uint64_t key = noise_key(seed, step, stream, index >> 1);
  const double u1 = (static_cast<double>(mix64(key ^ 1) >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(mix64(key ^ 2) >> 11) * 0x1.0p-53;
  const double r = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
  return r * ((index & 1) ? std::sin(angle) : std::cos(angle));
}

void normal_pair(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t pair, double* out) {
  const std::uint64_t key = noise_key(seed, step, stream, pair);
  const double u1 = (static_cast<double>(mix64(key ^ 1) >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(mix64(key ^ 2) >> 11) * 0x1.0p-53;
  const double r = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
  out[0] = r * std::cos(angle);
  out[1] = r * std::sin(angle);
}

std::vector<std::int64_t> poisson_sample(std::uint64_t seed, std::uint64_t step, index_t n, double q) {
  std::vector<std::int64_t> out;
  if (q <= 0.0 || n <= 0) return out;
  if (q >= 1.0) {
    out.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = i;
    return out;
  }
  out.reserve(static_cast<std::size_t>(static_cast<double>(n) * q * 1.2) + 16);
  std::uint64_t rng = noise_key(seed, step, kStreamSample, 0);
  const double log_miss = std::log1p(-q);
  double pos = -1.0;
  for (;;) {  // the gap to the next included example is Geometric(q): floor(log(U) / log(1 - q))
    const double u = 1.0 - uniform01(rng);  // (0, 1]
    pos += std::floor(std::log(u) / log_miss) + 1.0;
    if (pos >= static_cast<double>(n)) break;
    out.push_back(static_cast<std::int64_t>(pos));
  }
  return out;
}

std::int64_t binomial_draw(std::int64_t trials, double p, std::uint64_t& rng) {
  if (trials <= 0 || p <= 0.0) return 0;
  if (p >= 1.0 - 1e-12) return trials;
  const auto piece = static_cast<std::int64_t>(std::max(1.0, std::floor(32.0 / p)));
  std::int64_t total = 0;
  for (std::int64_t done = 0; done < trials; done += piece) {
    const std::int64_t t = std::min(piece, trials - done);
    const double u = uniform01(rng), odds = p / (1.0 - p);
    double pmf = std::exp(static_cast<double>(t) * std::log1p(-p)), cdf = pmf;
    std::int64_t k = 0;
    while (u > cdf && k < t) {
      pmf *= static_cast<double>(t - k) / static_cast<double>(k + 1) * odds;
      ++k;
      cdf += pmf;
    }
    total += k;
  }
  return total;
}

void field_example_norms(const KernelSet& ks, const FieldModel& m, const Examples& ex, const std::int64_t* rows,
                         index_t n_pos, const NegativeSampler& sampler, std::uint64_t step,
                         const PrivacySettings& ps, float* out, int n_threads) {
  FieldBatchPass pass(m, n_pos * (1 + std::max(sampler.negatives, 0)));
  pass.gather(ex, rows, n_pos, sampler, noise_key(ps.seed, step, kStreamNegatives, 0));
  pass.run(ks, noise_key(ps.seed, step, kStreamDropout, 0), n_threads);
  std::vector<double> squares;
  row_norm_squares(m, pass, squares, n_threads);
  for (std::size_t r = 0; r < squares.size(); ++r) out[r] = static_cast<float>(std::sqrt(squares[r]));
}

EpochResult field_private_steps(const KernelSet& ks, FieldModel& m, Optimizer& opt, const Examples& ex,
                                const PrivacySettings& ps, float alpha, double den, const NegativeSampler& sampler,
                                std::int64_t first_step, std::int64_t n_steps, const StopCheck& stop, int n_threads) {
  require(!ps.sparse || ps.count_noise > 0.0, "the sparse mechanism needs count noise > 0");
  require(den > 0.0, "the denominator must be positive");
  check_count_groups(m, ps);
  EpochResult result;
  StepBuffers buffers;
  std::unique_ptr<FieldBatchPass> pass;
  index_t capacity = 0, done = 0;
  const int negatives = std::max(sampler.negatives, 0);
  for (std::int64_t t = 0; t < n_steps; ++t) {
    if (stop && stop(done)) break;
    const auto step = static_cast<std::uint64_t>(first_step + t);
    const std::vector<std::int64_t> rows = poisson_sample(ps.seed, step, ex.rows, ps.sampling_rate);
    Units units{static_cast<index_t>(rows.size()), negatives};
    double loss = 0.0;
    if (units.n_pos > 0) {
      if (units.rows() > capacity) {  // a Poisson batch may exceed the last one: grow the buffers
        capacity = units.rows() + units.rows() / 4;
        pass = std::make_unique<FieldBatchPass>(m, capacity);
      }
      pass->gather(ex, rows.data(), units.n_pos, sampler, noise_key(ps.seed, step, kStreamNegatives, 0));
      loss = pass->run(ks, noise_key(ps.seed, step, kStreamDropout, 0), n_threads);
      if (!std::isfinite(loss)) {
        result.diverged = true;
        break;
      }
    }
    private_update(ks, m, opt, units.n_pos > 0 ? pass.get() : nullptr, units, ps, alpha, den, step, buffers,
                   n_threads);
    result.loss_sum += loss;
    result.rows += units.rows();
    done += units.n_pos;
  }
  return result;
}

}  // namespace fastrec
