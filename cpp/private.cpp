// DP-SGD for the field model (private.h; docs/DESIGN.md, "Differential privacy (issue 16)").
//
// Ghost norms: every per-example gradient is linear in that example's output gradient, and each weight
// gradient is an outer product summed over examples, so example r's squared gradient norm is
//   sum over layers (||a_r||^2 + 1) ||delta_r||^2        (weights: the outer product's norm; +1: the bias)
// + sum over embedding fields ||u_r||^2 sum_j w_j^2    (u_r: the field's upstream gradient; w_j: the summed
//                                                      weight of each distinct row j in the bag)
// + delta_r^2 ||pu_r * pv_r||^2                        (the GMF weight vector)
// all read from one backward pass. A unit of several rows (a user's examples) has the norm of its rows' sum:
// the same terms with the cross products of its rows (sum over pairs (a_r.a_s + 1)(delta_r.delta_s), the
// embedding rows' summed gradients). Scaling row r's deltas, upstream gradients and GMF term by its unit's
// c then gives the clipped gradients through the same products.
//
// A step runs: the batch pass (fields.cpp), one pass over fixed blocks of rows (norms, clip factors, scaled
// deltas, the blocks' bias and GMF sums), the weight products, one region that noises and updates every dense
// array, then per table the selected rows (their gradient, noise and update only).
#include "private.h"

#include <algorithm>
#include <iterator>
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

// The noise of one (seed, step, stream): noise_key's first three mixes done once.
struct NoiseStream {
  std::uint64_t prefix;
  NoiseStream(std::uint64_t seed, std::uint64_t step, std::uint64_t stream)
      : prefix(mix64(mix64(mix64(seed) ^ step) ^ stream)) {}
  std::uint64_t key(std::uint64_t index) const { return mix64(prefix ^ index); }
  // Marsaglia's polar method on the pair's key: points (x, y) uniform in [-1, 1)^2 from the words
  // mix64(key ^ 1), mix64(key ^ 2), then ^ 3, ^ 4 ... until one falls inside the unit disc (s = x^2 + y^2 in
  // (0, 1): 4 / pi tries on average); then x f and y f, f = sqrt(-2 ln(s) / s), are two independent standard
  // normals (indices 2k and 2k + 1). One logarithm and no sine or cosine: half the cost of Box-Muller.
  static double try_point(std::uint64_t k, std::uint64_t a, double& x, double& y) {
    x = static_cast<double>(mix64(k ^ a) >> 11) * 0x1.0p-52 - 1.0;
    y = static_cast<double>(mix64(k ^ (a + 1)) >> 11) * 0x1.0p-52 - 1.0;
    return x * x + y * y;
  }
  static bool inside(double s) { return s > 0.0 && s < 1.0; }
  void pair(std::uint64_t pair_index, double* out) const {
    const std::uint64_t k = key(pair_index);
    double x, y;
    for (std::uint64_t a = 1;; a += 2) {
      const double s = try_point(k, a, x, y);
      if (inside(s)) {
        const double f = std::sqrt(-2.0 * std::log(s) / s);
        out[0] = x * f;
        out[1] = y * f;
        return;
      }
    }
  }
  // The pairs pair_index[0:count] into out[2 t], out[2 t + 1] (the same numbers as pair()). In blocks whose
  // first tries are taken without a branch, so that the CPU overlaps the pairs' logarithms instead of
  // waiting on each (one pair alone is a chain of ~100 cycles).
  void pairs(const std::uint64_t* pair_index, index_t count, double* out) const {
    constexpr index_t kBlock = 64;
    double xs[kBlock], ys[kBlock], ss[kBlock];
    for (index_t t0 = 0; t0 < count; t0 += kBlock) {
      const index_t c = std::min(kBlock, count - t0);
      for (index_t t = 0; t < c; ++t) ss[t] = try_point(key(pair_index[t0 + t]), 1, xs[t], ys[t]);
      for (index_t t = 0; t < c; ++t)
        for (std::uint64_t a = 3; !inside(ss[t]); a += 2)
          ss[t] = try_point(key(pair_index[t0 + t]), a, xs[t], ys[t]);
      for (index_t t = 0; t < c; ++t) {
        const double f = std::sqrt(-2.0 * std::log(ss[t]) / ss[t]);
        out[2 * (t0 + t)] = xs[t] * f;
        out[2 * (t0 + t) + 1] = ys[t] * f;
      }
    }
  }
  // z[0 : k1 - k0] = normal numbers k0.. k1 - 1 (k0 even); scratch: pair indices.
  void range(std::uint64_t k0, std::uint64_t k1, double* z, std::vector<std::uint64_t>& scratch,
             std::vector<double>& buffer) const {
    const std::uint64_t p0 = k0 >> 1, p1 = (k1 + 1) >> 1;
    scratch.resize(static_cast<std::size_t>(p1 - p0));
    for (std::uint64_t p = p0; p < p1; ++p) scratch[static_cast<std::size_t>(p - p0)] = p;
    buffer.resize(2 * scratch.size());
    pairs(scratch.data(), static_cast<index_t>(scratch.size()), buffer.data());
    std::copy(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(k1 - k0), z);
  }
  double at(std::uint64_t index) const {
    double z[2];
    pair(index >> 1, z);
    return z[index & 1];
  }
};

// The rows of the batch: positives [0, n_pos), positive p's negatives at n_pos + p * negatives + j. A unit is
// a positive with its negatives (unit "example") or the positives [start[k], start[k + 1]) with theirs
// (unit "user").
struct Units {
  index_t n_pos = 0;
  int negatives = 0;
  std::vector<index_t> start;  // empty: one unit per positive
  index_t rows() const { return n_pos * (1 + negatives); }
  index_t count() const { return start.empty() ? n_pos : static_cast<index_t>(start.size()) - 1; }
  index_t first(index_t u) const { return start.empty() ? u : start[static_cast<std::size_t>(u)]; }
  index_t last(index_t u) const { return start.empty() ? u + 1 : start[static_cast<std::size_t>(u) + 1]; }
  // The batch rows of unit u, positives then negatives.
  void rows_of(index_t u, std::vector<index_t>& out) const {
    out.clear();
    for (index_t p = first(u); p < last(u); ++p) out.push_back(p);
    for (index_t p = first(u); p < last(u); ++p)
      for (int j = 0; j < negatives; ++j) out.push_back(n_pos + p * negatives + j);
  }
};

constexpr index_t kBlockRows = 64;   // rows per block of the row pass (fixed: sums do not depend on threads)
constexpr index_t kNoiseChunk = 4096;  // elements per task of the dense noise-and-update region (even)

// Buffers of one private step.
struct StepBuffers {
  std::vector<float> scale;     // c_r per row
  std::vector<std::vector<float>> deltas;  // clipped deltas per layer
  std::vector<float> grads;     // every dense array's gradient: W_0..W_{L-1}, b_0..b_{L-1}, GMF w
  std::vector<index_t> w_at, b_at;
  index_t gmf_at = 0, n_sums = 0;  // floats per block of the row pass: the biases, then GMF w
  std::vector<double> parts;    // the row pass's per-block sums
  std::vector<TouchedRows> field_touched;  // per field: group_by_column of the batch's bags
  TouchedRows filtered, selected;
  std::vector<std::int64_t> at;  // per selected row: its index among the filtered rows, or -1
  std::vector<float> rows_grad, selected_grad;
  std::vector<double> row_squares;
  struct Select {  // scratch of select_rows, one per group (the groups are selected in parallel)
    std::vector<double> counts;
    std::vector<std::int32_t> unit_ids, touched;
    std::vector<index_t> unit_rows;
    std::vector<std::uint64_t> pair_index;
    std::vector<double> pair_z, z, inv_sqrt;
  };
  std::vector<Select> select;
  std::vector<std::vector<std::int32_t>> group_selected;  // per field: its group's selected rows
};

// x . y in double, in 8 interleaved chains (one chain is bound by the add latency), added in a fixed order.
double dot(const float* x, const float* y, index_t n) {
  double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  index_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) s[t] += static_cast<double>(x[j + t]) * y[j + t];
  for (; j < n; ++j) s[0] += static_cast<double>(x[j]) * y[j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
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

// Field i's upstream gradient of row r (dim floats; a wide field's is the output delta).
const float* upstream_of(const FieldModel& m, const FieldBatchPass& pass, std::size_t i, index_t r) {
  const EmbeddingField& f = m.fields[i];
  if (f.offset >= 0) return pass.dx() + r * m.width + f.offset;
  if (f.wide) return pass.delta(m.mlp.layers.size() - 1) + r;
  return pass.gmf_delta(static_cast<int>(i) == m.gmf.field_u ? 0 : 1) + r * f.dim;
}

// Row r's squared gradient norm (ghost norms, see the top of this file).
double row_norm_squares(const KernelSet& ks, const FieldModel& m, const FieldBatchPass& pass, index_t r,
                        std::vector<std::pair<std::int32_t, float>>& scratch) {
  const std::size_t L = m.mlp.layers.size();
  double s = 0.0;
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = m.mlp.layers[l];
    const double d = ks.sum_squares(pass.delta(l) + r * layer.fan_out, layer.fan_out);
    if (d != 0.0) s += (ks.sum_squares(pass.layer_input(l) + r * pass.layer_input_ld(l), layer.fan_in) + 1.0) * d;
  }
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    const double u = ks.sum_squares(upstream_of(m, pass, i, r), m.fields[i].dim);
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
    const double D = pass.delta(L - 1)[r];
    s += D * D * g;
  }
  return s;
}

// Scratch of unit_norm_squares.
struct UnitScratch {
  struct Entry {
    std::int32_t id;
    std::int32_t order;  // position in the unit's entries: ties of one id summed in this order
    index_t row;
    float weight;
    bool operator<(const Entry& o) const { return id != o.id ? id < o.id : order < o.order; }
  };
  std::vector<Entry> entries;
  std::vector<double> acc;
};

// The squared norm of the summed gradient of the rows `rows` (a unit of several rows, see the top).
double unit_norm_squares(const FieldModel& m, const FieldBatchPass& pass, const std::vector<index_t>& rows,
                         UnitScratch& us) {
  const std::size_t L = m.mlp.layers.size(), k = rows.size();
  double s = 0.0;
  for (std::size_t l = 0; l < L; ++l) {  // sum over pairs (a_r.a_s + 1)(delta_r.delta_s), pairs r < s twice
    const index_t fi = m.mlp.layers[l].fan_in, fo = m.mlp.layers[l].fan_out, lda = pass.layer_input_ld(l);
    const float *A = pass.layer_input(l), *D = pass.delta(l);
    for (std::size_t x = 0; x < k; ++x)
      for (std::size_t y = x; y < k; ++y) {
        const double dd = dot(D + rows[x] * fo, D + rows[y] * fo, fo);
        if (dd == 0.0) continue;
        const double term = (dot(A + rows[x] * lda, A + rows[y] * lda, fi) + 1.0) * dd;
        s += x == y ? term : 2.0 * term;
      }
  }
  for (std::size_t i = 0; i < m.fields.size(); ++i) {  // each distinct table row: ||sum of weight * upstream||^2
    const CsrView bags = pass.bags(i);
    const index_t dim = m.fields[i].dim;
    us.entries.clear();
    for (index_t r : rows)
      for (index_t p = bags.indptr[r]; p < bags.indptr[r + 1]; ++p)
        us.entries.push_back({bags.indices[p], static_cast<std::int32_t>(us.entries.size()), r, bags.data[p]});
    std::sort(us.entries.begin(), us.entries.end());
    us.acc.resize(static_cast<std::size_t>(dim));
    for (std::size_t a = 0; a < us.entries.size();) {
      std::fill(us.acc.begin(), us.acc.end(), 0.0);
      std::size_t b = a;
      for (; b < us.entries.size() && us.entries[b].id == us.entries[a].id; ++b) {
        const float* u = upstream_of(m, pass, i, us.entries[b].row);
        for (index_t j = 0; j < dim; ++j) us.acc[static_cast<std::size_t>(j)] += static_cast<double>(us.entries[b].weight) * u[j];
      }
      for (double v : us.acc) s += v * v;
      a = b;
    }
  }
  if (m.gmf.field_u >= 0) {
    const index_t d = m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
    const float* D = pass.delta(L - 1);
    us.acc.assign(static_cast<std::size_t>(d), 0.0);
    for (index_t r : rows) {
      const float *pu = pass.gmf_pooled(0) + r * d, *pv = pass.gmf_pooled(1) + r * d;
      for (index_t j = 0; j < d; ++j) us.acc[static_cast<std::size_t>(j)] += static_cast<double>(D[r]) * pu[j] * pv[j];
    }
    for (double v : us.acc) s += v * v;
  }
  return s;
}

float clip_scale(double squares, double bound) {
  return squares > bound * bound ? static_cast<float>(bound / std::sqrt(squares)) : 1.0f;
}

// The layout of the dense gradients in b.grads and of the row pass's block sums.
void layout(const FieldModel& m, StepBuffers& b) {
  const std::size_t L = m.mlp.layers.size();
  b.w_at.resize(L);
  b.b_at.resize(L);
  index_t at = 0;
  for (std::size_t l = 0; l < L; ++l) {
    b.w_at[l] = at;
    at += m.mlp.layers[l].fan_in * m.mlp.layers[l].fan_out;
  }
  index_t sums = 0;
  for (std::size_t l = 0; l < L; ++l) {
    b.b_at[l] = at + sums;
    sums += m.mlp.layers[l].fan_out;
  }
  b.gmf_at = at + sums;
  if (m.gmf.field_u >= 0) sums += m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim;
  b.n_sums = sums;
  b.grads.assign(static_cast<std::size_t>(at + sums), 0.0f);
}

// The row pass over fixed blocks of kBlockRows rows: unit "example" computes each row's norm and clip factor
// here (clip bound per row: C / (1 + negatives)); unit "user" reads b.scale filled before. Then the scaled
// deltas and the block's sums of the scaled bias deltas and GMF terms; the sums of all blocks go to b.grads
// in block order (the same for any n_threads).
void row_pass(const KernelSet& ks, const FieldModel& m, const FieldBatchPass& pass, bool row_clip, double bound, StepBuffers& b,
              int n_threads) {
  const std::size_t L = m.mlp.layers.size();
  const index_t n = pass.rows(), blocks = (n + kBlockRows - 1) / kBlockRows, sums = b.n_sums;
  const index_t base = b.b_at.empty() ? b.gmf_at : b.b_at[0];
  if (row_clip) {
    b.scale.resize(static_cast<std::size_t>(n));
  }
  b.deltas.resize(L);
  for (std::size_t l = 0; l < L; ++l) b.deltas[l].resize(static_cast<std::size_t>(n * m.mlp.layers[l].fan_out));
  b.parts.assign(static_cast<std::size_t>(blocks * sums), 0.0);
  const index_t gmf_d = m.gmf.field_u >= 0 ? m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim : 0;
  const float* D_out = pass.delta(L - 1);
  parallel_for(0, blocks, n_threads, [&](std::int64_t blk) {
    std::vector<std::pair<std::int32_t, float>> scratch;
    double* part = b.parts.data() + blk * sums;
    for (index_t r = blk * kBlockRows; r < std::min(n, (blk + 1) * kBlockRows); ++r) {
      if (row_clip) {
        b.scale[static_cast<std::size_t>(r)] = clip_scale(row_norm_squares(ks, m, pass, r, scratch), bound);
      }
      const float c = b.scale[static_cast<std::size_t>(r)];
      for (std::size_t l = 0; l < L; ++l) {
        const index_t fo = m.mlp.layers[l].fan_out;
        const float* d = pass.delta(l) + r * fo;
        float* out = b.deltas[l].data() + r * fo;
        double* ps = part + (b.b_at[l] - base);
        for (index_t j = 0; j < fo; ++j) {
          out[j] = c * d[j];
          ps[j] += out[j];
        }
      }
      if (gmf_d > 0) {
        const float *pu = pass.gmf_pooled(0) + r * gmf_d, *pv = pass.gmf_pooled(1) + r * gmf_d;
        const double cd = static_cast<double>(c * D_out[r]);
        double* ps = part + (b.gmf_at - base);
        for (index_t j = 0; j < gmf_d; ++j) ps[j] += cd * pu[j] * pv[j];
      }
    }
  });
  for (index_t j = 0; j < sums; ++j) {
    double s = 0.0;
    for (index_t blk = 0; blk < blocks; ++blk) s += b.parts[static_cast<std::size_t>(blk * sums + j)];
    b.grads[static_cast<std::size_t>(base + j)] = static_cast<float>(s);
  }
}

// One dense array of the noise-and-update region.
struct DenseArray {
  std::uint64_t stream;
  float* p;
  float* g;
  float *s1, *s2;
  index_t len;
  float alpha;  // L2 weight (0: biases)
};

// g = (g + sigma C z + alpha p) / den, then the optimizer's update, for every dense array in one parallel
// region of kNoiseChunk-element tasks (z_k = normal number k of the array's stream: whole pairs per task).
void noise_and_update(const KernelSet& ks, const UpdateRule& rule, const std::vector<DenseArray>& arrays,
                      const PrivacySettings& ps, std::uint64_t step, double den, int n_threads) {
  std::vector<std::pair<std::size_t, index_t>> tasks;  // (array, first element)
  for (std::size_t a = 0; a < arrays.size(); ++a)
    for (index_t k = 0; k < arrays[a].len; k += kNoiseChunk) tasks.emplace_back(a, k);
  const double std_dev = ps.noise_multiplier * ps.max_grad_norm;
  parallel_for(0, static_cast<std::int64_t>(tasks.size()), n_threads, [&](std::int64_t t) {
    const DenseArray& a = arrays[tasks[static_cast<std::size_t>(t)].first];
    const index_t k0 = tasks[static_cast<std::size_t>(t)].second, k1 = std::min(a.len, k0 + kNoiseChunk);
    thread_local std::vector<std::uint64_t> scratch;
    thread_local std::vector<double> buffer, z;
    z.assign(static_cast<std::size_t>(k1 - k0), 0.0);
    if (std_dev != 0.0)
      NoiseStream(ps.seed, step, a.stream)
          .range(static_cast<std::uint64_t>(k0), static_cast<std::uint64_t>(k1), z.data(), scratch, buffer);
    for (index_t k = k0; k < k1; ++k) {
      double v = a.g[k] + std_dev * z[static_cast<std::size_t>(k - k0)];
      if (a.alpha != 0.0f) v += static_cast<double>(a.alpha) * a.p[k];
      a.g[k] = static_cast<float>(v / den);
    }
    ks.update(rule, a.p + k0, a.g + k0, a.s1 ? a.s1 + k0 : nullptr, a.s2 ? a.s2 + k0 : nullptr, k1 - k0);
  });
}

// The rows of the tables of group `group` (fields i with count_group[i] == group) to update this step, sorted,
// into sel. "sparse": DP-AdaFEST's thresholded noisy contribution counts; "dense": every row.
void select_rows(const FieldModel& m, int group, const FieldBatchPass* pass, const Units& units,
                 const PrivacySettings& ps, std::uint64_t step, const std::vector<TouchedRows>& field_touched,
                 StepBuffers::Select& b, std::vector<std::int32_t>& sel) {
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
  // The rows the batch reads in any table of the group, and their contribution counts: each unit adds
  // 1 / sqrt(k) to each of the k distinct rows it reads (its rows: its positives and their negatives), so
  // that its contribution vector has L2 norm 1 (the count mechanism's sensitivity).
  std::vector<std::int32_t>& touched = b.touched;
  touched.clear();
  b.counts.clear();
  if (pass && members.size() == 1 && units.start.empty() && units.negatives == 0) {
    // A unit is one bag of one table: each of its k distinct rows gets 1 / sqrt(k). The table's touched
    // rows list each row's batch rows in order (a row repeated in a bag appears twice in a row: once).
    const TouchedRows& t = field_touched[members[0]];
    const CsrView bags = pass->bags(members[0]);
    touched = t.ids;
    b.counts.assign(touched.size(), 0.0);
    b.inv_sqrt.assign(static_cast<std::size_t>(bags.rows), -1.0);
    for (std::size_t g = 0; g < t.ids.size(); ++g) {
      double c = 0.0;
      std::int32_t last = -1;
      for (std::int64_t e = t.start[g]; e < t.start[g + 1]; ++e) {
        const std::int32_t r = t.rows[static_cast<std::size_t>(e)];
        if (r == last) continue;
        last = r;
        double& w = b.inv_sqrt[static_cast<std::size_t>(r)];
        if (w < 0.0) {
          const index_t p0 = bags.indptr[r], p1 = bags.indptr[r + 1];
          b.unit_ids.assign(bags.indices + p0, bags.indices + p1);
          std::sort(b.unit_ids.begin(), b.unit_ids.end());
          const auto k = std::unique(b.unit_ids.begin(), b.unit_ids.end()) - b.unit_ids.begin();
          w = 1.0 / std::sqrt(static_cast<double>(k));
        }
        c += w;
      }
      b.counts[g] = c;
    }
  } else if (pass) {
    for (std::size_t i : members) {
      const std::vector<std::int32_t>& ids = field_touched[i].ids;
      b.unit_ids.swap(touched);
      touched.clear();
      std::set_union(b.unit_ids.begin(), b.unit_ids.end(), ids.begin(), ids.end(), std::back_inserter(touched));
    }
    b.counts.assign(touched.size(), 0.0);
  }
  auto add = [&](std::int32_t id, double w) {
    b.counts[static_cast<std::size_t>(std::lower_bound(touched.begin(), touched.end(), id) - touched.begin())] += w;
  };
  const bool generic = !(members.size() == 1 && units.start.empty() && units.negatives == 0);
  for (index_t u = 0; pass && generic && u < units.count(); ++u) {
    units.rows_of(u, b.unit_rows);
    b.unit_ids.clear();
    for (std::size_t i : members) {
      const CsrView bags = pass->bags(i);
      for (index_t r : b.unit_rows)
        b.unit_ids.insert(b.unit_ids.end(), bags.indices + bags.indptr[r], bags.indices + bags.indptr[r + 1]);
    }
    std::sort(b.unit_ids.begin(), b.unit_ids.end());
    b.unit_ids.erase(std::unique(b.unit_ids.begin(), b.unit_ids.end()), b.unit_ids.end());
    const double w = 1.0 / std::sqrt(static_cast<double>(b.unit_ids.size()));
    for (std::int32_t id : b.unit_ids) add(id, w);
  }
  const NoiseStream count_noise(ps.seed, step, kStreamFieldCount + static_cast<std::uint64_t>(group));
  auto above = [&](double count, double z) { return count + ps.count_noise * z > ps.threshold; };
  const auto n_touched = static_cast<index_t>(touched.size());
  const index_t untouched = vocab - n_touched;
  // Rows outside the batch have count 0: each passes with p = P(N(0, sigma1^2) > tau). A small table draws
  // them one by one; a large one draws how many pass (Binomial(untouched, p)) and which (uniformly among the
  // untouched rows): the same distribution, at a cost that follows the rows selected, not the table.
  constexpr index_t kDirectRows = 1 << 16;
  if (untouched <= kDirectRows) {
    b.z.resize(static_cast<std::size_t>(vocab));
    count_noise.range(0, static_cast<std::uint64_t>(vocab), b.z.data(), b.pair_index, b.pair_z);
    std::size_t g = 0;
    for (index_t j = 0; j < vocab; ++j) {
      const auto id = static_cast<std::int32_t>(j);
      const bool in_batch = g < touched.size() && touched[g] == id;
      if (above(in_batch ? b.counts[g] : 0.0, b.z[static_cast<std::size_t>(j)])) sel.push_back(id);
      if (in_batch) ++g;
    }
    return;
  }
  b.pair_index.resize(touched.size());
  for (std::size_t g = 0; g < touched.size(); ++g) b.pair_index[g] = static_cast<std::uint64_t>(touched[g]) >> 1;
  b.pair_z.resize(2 * touched.size());
  count_noise.pairs(b.pair_index.data(), n_touched, b.pair_z.data());
  for (std::size_t g = 0; g < touched.size(); ++g)
    if (above(b.counts[g], b.pair_z[2 * g + (touched[g] & 1)])) sel.push_back(touched[g]);
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

// The entries of `touched` whose row is in the sorted `sel`, with each value scaled by its batch row's clip
// factor c; at[s] = index of sel[s] among them, or -1.
void filter_touched(const TouchedRows& touched, const std::vector<std::int32_t>& sel, const float* c,
                    TouchedRows& out, std::vector<std::int64_t>& at) {
  out.ids.clear();
  out.start.assign(1, 0);
  out.rows.clear();
  out.values.clear();
  at.assign(sel.size(), -1);
  std::size_t g = 0;
  for (std::size_t s = 0; s < sel.size(); ++s) {
    while (g < touched.ids.size() && touched.ids[g] < sel[s]) ++g;
    if (g == touched.ids.size()) break;
    if (touched.ids[g] != sel[s]) continue;
    at[s] = static_cast<std::int64_t>(out.ids.size());
    out.ids.push_back(sel[s]);
    for (std::int64_t e = touched.start[g]; e < touched.start[g + 1]; ++e) {
      out.rows.push_back(touched.rows[static_cast<std::size_t>(e)]);
      out.values.push_back(touched.values[static_cast<std::size_t>(e)] * c[touched.rows[static_cast<std::size_t>(e)]]);
    }
    out.start.push_back(static_cast<std::int64_t>(out.rows.size()));
  }
}

// One private step's gradients and updates, from a batch pass (nullptr: an empty sample, noise only).
void private_update(const KernelSet& ks, FieldModel& m, Optimizer& opt, const FieldBatchPass* pass,
                    const Units& units, const PrivacySettings& ps, float alpha, double den, std::uint64_t step,
                    StepBuffers& b, int n_threads) {
  const std::size_t L = m.mlp.layers.size();
  const index_t n = pass ? pass->rows() : 0;
  layout(m, b);
  if (pass) {
    const bool per_unit = !units.start.empty();
    if (per_unit) {  // unit "user": each unit's exact norm, its clip factor to all its rows
      const index_t count = units.count();
      b.scale.resize(static_cast<std::size_t>(n));
      parallel_for(0, count, n_threads, [&](std::int64_t u) {
        UnitScratch us;
        std::vector<index_t> rows;
        units.rows_of(u, rows);
        const float c = clip_scale(unit_norm_squares(m, *pass, rows, us), ps.max_grad_norm);
        for (index_t r : rows) b.scale[static_cast<std::size_t>(r)] = c;
      });
    }
    row_pass(ks, m, *pass, !per_unit, ps.max_grad_norm / (1.0 + units.negatives), b, n_threads);
    // MLP weights: dW = A^T (c * D) (the biases' and GMF sums come from the row pass)
    for (std::size_t l = 0; l < L; ++l) {
      const Layer& layer = m.mlp.layers[l];
      sgemm(ks, true, false, layer.fan_in, layer.fan_out, n, pass->layer_input(l), pass->layer_input_ld(l),
            b.deltas[l].data(), layer.fan_out, b.grads.data() + b.w_at[l], layer.fan_out, nullptr, n_threads);
    }
  }
  const UpdateRule rule = opt.next_step();
  const UpdateRule row_rule = embedding_rule(rule);
  std::vector<DenseArray> arrays;
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = m.mlp.layers[l];
    arrays.push_back({l, layer.W, b.grads.data() + b.w_at[l], opt.state1[l],
                      l < opt.state2.size() ? opt.state2[l] : nullptr, layer.fan_in * layer.fan_out, alpha});
  }
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = m.mlp.layers[l];
    arrays.push_back({L + l, layer.b, b.grads.data() + b.b_at[l], opt.state1[L + l],
                      L + l < opt.state2.size() ? opt.state2[L + l] : nullptr, layer.fan_out, 0.0f});
  }
  if (m.gmf.field_u >= 0)  // read the tables before they change: done (row pass)
    arrays.push_back({kStreamGmf, m.gmf.w, b.grads.data() + b.gmf_at, m.gmf.state1, m.gmf.state2,
                      m.fields[static_cast<std::size_t>(m.gmf.field_u)].dim, alpha});
  noise_and_update(ks, rule, arrays, ps, step, den, n_threads);
  // Embedding tables: per group, the rows selected; per table, the clipped gradient sums of the selected
  // rows the batch reads (zero for the others), their noise and update.
  const double std_dev = ps.noise_multiplier * ps.max_grad_norm;
  b.group_selected.resize(m.fields.size());
  b.select.resize(m.fields.size());
  b.field_touched.resize(m.fields.size());
  std::vector<int> groups;
  for (std::size_t i = 0; i < m.fields.size(); ++i)
    if (ps.count_group[i] == static_cast<int>(i)) groups.push_back(static_cast<int>(i));
  if (pass)  // each table's rows read by the batch, with their entries (batch rows in order)
    parallel_for<true>(0, static_cast<std::int64_t>(m.fields.size()), n_threads, [&](std::int64_t i) {
      group_by_column(pass->bags(static_cast<std::size_t>(i)), b.field_touched[static_cast<std::size_t>(i)]);
    });
  parallel_for<true>(0, static_cast<std::int64_t>(groups.size()), n_threads, [&](std::int64_t k) {
    const auto g = static_cast<std::size_t>(groups[static_cast<std::size_t>(k)]);
    select_rows(m, static_cast<int>(g), pass, units, ps, step, b.field_touched, b.select[g], b.group_selected[g]);
  });
  for (std::size_t i = 0; i < m.fields.size(); ++i) {
    EmbeddingField& f = m.fields[i];
    const index_t dim = f.dim;
    const int group = ps.count_group[i];
    b.selected.ids = b.group_selected[static_cast<std::size_t>(group)];
    const std::vector<std::int32_t>& sel = b.selected.ids;
    if (sel.empty()) continue;
    b.at.assign(sel.size(), -1);
    if (pass) {
      filter_touched(b.field_touched[i], sel, b.scale.data(), b.filtered, b.at);
      b.rows_grad.resize(b.filtered.ids.size() * static_cast<std::size_t>(dim));
      const float* up = upstream_of(m, *pass, i, 0);
      const index_t ld = f.offset >= 0 ? m.width : f.wide ? 1 : dim;
      touched_rows_gradient(ks, b.filtered, up, ld, f.table, dim, 0.0f, 1.0f, b.rows_grad.data(), b.row_squares,
                            n_threads);
    }
    const float alpha_f = f.alpha >= 0.0f ? f.alpha : alpha;
    b.selected_grad.resize(sel.size() * static_cast<std::size_t>(dim));
    const NoiseStream noise(ps.seed, step, kStreamFieldGrad + i);
    parallel_for(0, static_cast<std::int64_t>(sel.size()), sel.size() * dim < 16384 ? 1 : n_threads, [&](std::int64_t s) {
      const std::int32_t id = sel[static_cast<std::size_t>(s)];
      const std::int64_t at = b.at[static_cast<std::size_t>(s)];
      const float* sum = at >= 0 ? b.rows_grad.data() + at * dim : nullptr;
      const float* row = f.table + static_cast<index_t>(id) * dim;
      float* g = b.selected_grad.data() + s * dim;
      double z[2] = {0.0, 0.0};
      for (index_t j = 0; j < dim; ++j) {
        const std::uint64_t k = static_cast<std::uint64_t>(id) * dim + j;
        if ((j == 0 || (k & 1) == 0) && std_dev != 0.0) noise.pair(k >> 1, z);
        double v = (sum ? sum[j] : 0.0) + std_dev * z[k & 1] + static_cast<double>(alpha_f) * row[j];
        g[j] = static_cast<float>(v / den);
      }
    });
    update_touched_rows(ks, row_rule, b.selected, f.table, dim, b.selected_grad.data(), f.state1, f.state2, n_threads);
    mark_touched(f, b.selected);
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
  return NoiseStream(seed, step, stream).key(index);
}

double normal_at(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t index) {
  return NoiseStream(seed, step, stream).at(index);
}

void normal_pair(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t pair, double* out) {
  NoiseStream(seed, step, stream).pair(pair, out);
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

std::vector<std::int64_t> unit_sample(const PrivacySettings& ps, std::uint64_t step, std::vector<index_t>& unit_start) {
  const std::vector<std::int64_t> units = poisson_sample(ps.seed, step, ps.n_units, ps.sampling_rate);
  std::vector<std::int64_t> rows;
  std::vector<index_t> picked;
  unit_start.assign(1, 0);
  for (std::int64_t u : units) {
    const index_t begin = ps.unit_indptr[u], count = ps.unit_indptr[u + 1] - begin;
    if (count <= ps.unit_cap) {
      rows.insert(rows.end(), ps.unit_rows + begin, ps.unit_rows + begin + count);
    } else {  // unit_cap of its examples, uniformly without replacement (Floyd's algorithm), in stored order
      std::uint64_t rng = noise_key(ps.seed, step, kStreamUnitPick, static_cast<std::uint64_t>(u));
      picked.clear();
      for (index_t j = count - ps.unit_cap; j < count; ++j) {
        const auto t = std::min<index_t>(static_cast<index_t>(uniform01(rng) * static_cast<double>(j + 1)), j);
        picked.push_back(std::find(picked.begin(), picked.end(), t) == picked.end() ? t : j);
      }
      std::sort(picked.begin(), picked.end());
      for (index_t t : picked) rows.push_back(ps.unit_rows[begin + t]);
    }
    unit_start.push_back(static_cast<index_t>(rows.size()));
  }
  return rows;
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
  parallel_for(0, pass.rows(), n_threads, [&](std::int64_t r) {
    std::vector<std::pair<std::int32_t, float>> scratch;
    out[r] = static_cast<float>(std::sqrt(row_norm_squares(ks, m, pass, r, scratch)));
  });
}

EpochResult field_private_steps(const KernelSet& ks, FieldModel& m, Optimizer& opt, const Examples& ex,
                                const PrivacySettings& ps, float alpha, double den, const NegativeSampler& sampler,
                                std::int64_t first_step, std::int64_t n_steps, const StopCheck& stop, int n_threads) {
  require(!ps.sparse || ps.count_noise > 0.0, "the sparse mechanism needs count noise > 0");
  require(den > 0.0, "the denominator must be positive");
  check_count_groups(m, ps);
  if (ps.unit_indptr) {
    require(ps.n_units >= 1 && ps.unit_cap >= 1, "the user unit needs units and a cap >= 1");
    require(ps.unit_indptr[0] == 0 && ps.unit_indptr[ps.n_units] <= ex.rows, "unit_indptr must index the examples");
  }
  EpochResult result;
  StepBuffers buffers;
  std::unique_ptr<FieldBatchPass> pass;
  index_t capacity = 0, done = 0;
  const int negatives = std::max(sampler.negatives, 0);
  BatchThreads batch_threads(n_threads);  // the busy-machine choice of 1 or all threads (parallel.h)
  for (std::int64_t t = 0; t < n_steps; ++t) {
    if (stop && stop(done)) break;
    const int threads = batch_threads.next();
    const auto step = static_cast<std::uint64_t>(first_step + t);
    Units units;
    units.negatives = negatives;
    const std::vector<std::int64_t> rows = ps.unit_indptr ? unit_sample(ps, step, units.start)
                                                          : poisson_sample(ps.seed, step, ex.rows, ps.sampling_rate);
    units.n_pos = static_cast<index_t>(rows.size());
    double loss = 0.0;
    if (units.n_pos > 0) {
      if (units.rows() > capacity) {  // a Poisson batch may exceed the last one: grow the buffers
        capacity = units.rows() + units.rows() / 4;
        pass = std::make_unique<FieldBatchPass>(m, capacity);
      }
      pass->gather(ex, rows.data(), units.n_pos, sampler, noise_key(ps.seed, step, kStreamNegatives, 0));
      loss = pass->run(ks, noise_key(ps.seed, step, kStreamDropout, 0), threads);
      if (!std::isfinite(loss)) {
        result.diverged = true;
        break;
      }
    }
    private_update(ks, m, opt, units.n_pos > 0 ? pass.get() : nullptr, units, ps, alpha, den, step, buffers,
                   threads);
    result.loss_sum += loss;
    result.rows += units.rows();
    done += units.n_pos;
    batch_threads.done(units.rows());
  }
  return result;
}

}  // namespace fastrec
