#include "multvae.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "gemm.h"
#include "parallel.h"
#include "sparse.h"

namespace fastrec {

namespace {

constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
// Rows per task of the per-row loops (loss, KL); columns per task of the bias sums.
constexpr index_t kRowsPerTask = 16;
constexpr index_t kBiasColumns = 256;

// Output e (from 0) of the splitmix64 stream seeded with `state`.
std::uint64_t stream_output(std::uint64_t state, std::uint64_t e) {
  std::uint64_t s = state + e * kGolden;
  return splitmix64(s);
}

struct NoiseKeys {
  std::uint64_t stream;
  NoiseKeys(std::uint64_t seed, std::int64_t step) : stream(stream_output(seed, static_cast<std::uint64_t>(step))) {}
  std::uint64_t dropout(std::int64_t row) const { return stream_output(stream, 2 * static_cast<std::uint64_t>(row)); }
  std::uint64_t gauss(std::int64_t row) const { return stream_output(stream, 2 * static_cast<std::uint64_t>(row) + 1); }
};

// n standard normal draws from key: Box-Muller on outputs 2c and 2c + 1 (top 53 bits each), in double.
void gaussian_row(std::uint64_t key, index_t n, float* out) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (index_t c = 0; c < n; ++c) {
    const double a = static_cast<double>(stream_output(key, 2 * static_cast<std::uint64_t>(c)) >> 11) * 0x1.0p-53;
    const double b = static_cast<double>(stream_output(key, 2 * static_cast<std::uint64_t>(c) + 1) >> 11) * 0x1.0p-53;
    out[c] = static_cast<float>(std::sqrt(-2.0 * std::log1p(-a)) * std::cos(kTwoPi * b));
  }
}

// Buffers of one batch, reused across the batches of a call.
struct AeWorkspace {
  // The batch's input: normalised, dropped-out bags (dropped entries removed); targets: the raw bags.
  std::vector<std::int64_t> in_indptr, t_indptr;
  std::vector<std::int32_t> in_indices, t_indices;
  std::vector<float> in_values, t_values, scale_row;
  std::vector<std::vector<float>> acts;    // acts[l]: layer l's output (acts[L - 1]: logits, then dLoss/dlogits)
  std::vector<std::vector<float>> deltas;  // deltas[l]: dLoss/d(layer l's pre-activation), l < L - 1
  std::vector<float> z, eps, dz;
  std::vector<std::vector<float>> grad_w, grad_b;  // grad_w[0]: unused (touched rows in touched_grad)
  std::vector<float> touched_grad;
  TouchedRows touched;
  std::vector<double> row_squares, row_nll, row_kl;
  std::vector<float> ones;
  std::vector<std::int32_t> row_ids;

  AeWorkspace(const AutoencoderNet& net, bool training) {
    const std::size_t L = net.layers.size();
    acts.resize(L);
    deltas.resize(L);
    if (training) {
      grad_w.resize(L);
      grad_b.resize(L);
      for (std::size_t l = 0; l < L; ++l) {
        if (l > 0) grad_w[l].resize(static_cast<std::size_t>(net.layers[l].fan_in * net.layers[l].fan_out));
        grad_b[l].resize(static_cast<std::size_t>(net.layers[l].fan_out));
      }
    }
  }
};

// Layer l's input: the bags (l = 0, not here), z (the VAE's first decoder layer) or layer l - 1's output.
const float* layer_input(const AutoencoderNet& net, const AeWorkspace& ws, std::size_t l) {
  return (net.variational && l == net.n_encoder) ? ws.z.data() : ws.acts[l - 1].data();
}

// A product of layer l: the output layer's in bf16 when training with net.bf16_output, else float32.
void layer_product(const KernelSet& ks, const AutoencoderNet& net, bool bf16, bool trans_a, bool trans_b, index_t M,
                   index_t N, index_t K, const float* A, index_t lda, const float* B, index_t ldb, float* C,
                   index_t ldc, const Epilogue* epilogue, int n_threads) {
  if (bf16)
    bf16_gemm(ks, net.bf16_native, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
  else
    sgemm(ks, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
}

// Fills ws.acts (and ws.z) for the batch in ws.in_*; eps: rows x latent noise or null (z = mu). training: the
// output layer in bf16 when the net asks for it.
void forward_batch(const KernelSet& ks, const AutoencoderNet& net, AeWorkspace& ws, index_t rows, const float* eps,
                   index_t n_cols, bool training, int n_threads) {
  const std::size_t L = net.layers.size();
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = net.layers[l];
    ws.acts[l].resize(static_cast<std::size_t>(rows * layer.fan_out));
    Epilogue e;
    e.bias = layer.b;
    e.act = net.activation(l);
    if (l == 0) {
      const CsrView X{ws.in_indptr.data(), ws.in_indices.data(), ws.in_values.data(), rows, n_cols};
      csr_matmul(ks, X, layer.W, layer.fan_out, layer.fan_out, ws.acts[0].data(), layer.fan_out, &e, n_threads);
    } else {
      layer_product(ks, net, training && net.bf16_output && l + 1 == L, false, false, rows, layer.fan_out,
                    layer.fan_in, layer_input(net, ws, l), layer.fan_in, layer.W, layer.fan_out, ws.acts[l].data(),
                    layer.fan_out, &e, n_threads);
    }
    if (net.variational && l + 1 == net.n_encoder) {  // z from [mu | logvar]
      const index_t k = net.latent();
      ws.z.resize(static_cast<std::size_t>(rows * k));
      const float* a = ws.acts[l].data();
      for (index_t r = 0; r < rows; ++r)
        for (index_t j = 0; j < k; ++j)
          ws.z[r * k + j] = eps ? a[r * 2 * k + j] + eps[r * k + j] * std::exp(0.5f * a[r * 2 * k + k + j])
                                : a[r * 2 * k + j];
    }
  }
}

// The column sums of D (rows x n) into out, each column summed in row order.
void column_sums(const KernelSet& ks, AeWorkspace& ws, const float* D, index_t rows, index_t n, float* out,
                 int n_threads) {
  if (static_cast<index_t>(ws.ones.size()) < rows) {
    ws.ones.assign(static_cast<std::size_t>(rows), 1.0f);
    ws.row_ids.resize(static_cast<std::size_t>(rows));
    for (index_t r = 0; r < rows; ++r) ws.row_ids[r] = static_cast<std::int32_t>(r);
  }
  const index_t tasks = (n + kBiasColumns - 1) / kBiasColumns;
  parallel_for(0, tasks, rows * n < (1 << 15) ? 1 : n_threads, [&](std::int64_t t) {
    const index_t c0 = t * kBiasColumns;
    ks.row_sum(ws.ones.data(), ws.row_ids.data(), rows, D + c0, n, std::min(kBiasColumns, n - c0), out + c0);
  });
}

// The batch's loss (nll and KL means; the caller adds the L2 term) with ws.acts[L - 1] turned into
// dLoss/dlogits and all gradients into ws.grad_* / ws.touched_grad. Reads W only (no update).
AutoencoderLoss loss_and_backward(const KernelSet& ks, const AutoencoderNet& net, AeWorkspace& ws, index_t rows,
                                  const float* eps, float beta, float l2, int n_threads) {
  const std::size_t L = net.layers.size();
  const index_t n_items = net.n_items();
  const float inv_n = 1.0f / static_cast<float>(rows);
  float* G = ws.acts[L - 1].data();
  ws.row_nll.assign(static_cast<std::size_t>(rows), 0.0);
  // Fused log-softmax and multinomial likelihood, in place: row r of G becomes (s softmax - x) / rows, s = sum x.
  const index_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(0, tasks, n_threads, [&](std::int64_t t) {
    for (index_t r = t * kRowsPerTask; r < std::min(rows, (t + 1) * kRowsPerTask); ++r) {
      float* g = G + r * n_items;
      double s = 0.0, dot = 0.0;
      for (std::int64_t p = ws.t_indptr[r]; p < ws.t_indptr[r + 1]; ++p) {
        s += ws.t_values[p];
        dot += static_cast<double>(ws.t_values[p]) * g[ws.t_indices[p]];
      }
      float max = 0.0f, sum = 0.0f;
      ks.exp_shift(g, n_items, &max, &sum);
      ws.row_nll[r] = s * (static_cast<double>(max) + std::log(static_cast<double>(sum))) - dot;
      const float c = static_cast<float>(s) / sum * inv_n;
      for (index_t j = 0; j < n_items; ++j) g[j] *= c;
      for (std::int64_t p = ws.t_indptr[r]; p < ws.t_indptr[r + 1]; ++p) g[ws.t_indices[p]] -= ws.t_values[p] * inv_n;
    }
  });
  AutoencoderLoss out;
  for (double v : ws.row_nll) out.nll += v;
  out.nll /= static_cast<double>(rows);

  for (std::size_t l = L; l-- > 0;) {
    const Layer& layer = net.layers[l];
    const float* D = l == L - 1 ? G : ws.deltas[l].data();
    const bool bf16 = net.bf16_output && l == L - 1;
    if (l > 0) {
      // dW = inputᵀ D (split over C's blocks, never over rows: the same sums for any thread count)
      layer_product(ks, net, bf16, true, false, layer.fan_in, layer.fan_out, rows, layer_input(net, ws, l),
                    layer.fan_in, D, layer.fan_out, ws.grad_w[l].data(), layer.fan_out, nullptr, n_threads);
      if (l2 > 0.0f) {
        float* gw = ws.grad_w[l].data();
        const index_t len = layer.fan_in * layer.fan_out;
        for (index_t i = 0; i < len; ++i) gw[i] += 2.0f * l2 * layer.W[i];
      }
    }
    column_sums(ks, ws, D, rows, layer.fan_out, ws.grad_b[l].data(), n_threads);
    if (l == 0) {
      const CsrView X{ws.in_indptr.data(), ws.in_indices.data(), ws.in_values.data(), rows, n_items};
      group_by_column(X, ws.touched);
      ws.touched_grad.resize(ws.touched.ids.size() * static_cast<std::size_t>(layer.fan_out));
      touched_rows_gradient(ks, ws.touched, D, layer.fan_out, layer.W, layer.fan_out, 2.0f * l2, 1.0f,
                            ws.touched_grad.data(), ws.row_squares, n_threads);
      break;
    }
    // D of layer l - 1 = (D W_lᵀ) * act'(its output): for the VAE's first decoder layer, dz first.
    const Layer& below = net.layers[l - 1];
    const bool to_z = net.variational && l == net.n_encoder;
    float* target;
    Epilogue e;
    if (to_z) {
      ws.dz.resize(static_cast<std::size_t>(rows * layer.fan_in));
      target = ws.dz.data();
    } else {
      ws.deltas[l - 1].resize(static_cast<std::size_t>(rows * below.fan_out));
      target = ws.deltas[l - 1].data();
      e.mul = ws.acts[l - 1].data();
      e.ld_mul = below.fan_out;
      e.mul_act = net.activation(l - 1);
    }
    layer_product(ks, net, bf16, false, true, rows, layer.fan_in, layer.fan_out, D, layer.fan_out, layer.W,
                  layer.fan_out, target, layer.fan_in, to_z ? nullptr : &e, n_threads);
    if (to_z) {  // [dmu | dlogvar] with the KL term's gradient, and the KL
      const index_t k = net.latent();
      ws.deltas[l - 1].resize(static_cast<std::size_t>(rows * 2 * k));
      ws.row_kl.assign(static_cast<std::size_t>(rows), 0.0);
      const float* a = ws.acts[l - 1].data();
      float* d = ws.deltas[l - 1].data();
      const float kl_scale = beta * inv_n;
      for (index_t r = 0; r < rows; ++r) {
        double kl = 0.0;
        for (index_t j = 0; j < k; ++j) {
          const float mu = a[r * 2 * k + j], logvar = a[r * 2 * k + k + j];
          const float var = std::exp(logvar), sd = std::exp(0.5f * logvar);
          const float dzj = ws.dz[r * k + j];
          kl += 0.5 * (static_cast<double>(var) + static_cast<double>(mu) * mu - 1.0 - logvar);
          d[r * 2 * k + j] = dzj + kl_scale * mu;
          d[r * 2 * k + k + j] = (eps ? dzj * eps[r * k + j] * 0.5f * sd : 0.0f) + kl_scale * 0.5f * (var - 1.0f);
        }
        ws.row_kl[r] = kl;
      }
      for (double v : ws.row_kl) out.kl += v;
      out.kl /= static_cast<double>(rows);
    }
  }
  out.loss = out.nll + static_cast<double>(beta) * out.kl;
  return out;
}

// The L2 term l2 * sum ||W||^2: the dense layers whole, the first layer's touched rows (ws.row_squares, from
// touched_rows_gradient).
double l2_term(const KernelSet& ks, const AutoencoderNet& net, const AeWorkspace& ws, float l2) {
  if (l2 <= 0.0f) return 0.0;
  double squares = 0.0;
  for (double v : ws.row_squares) squares += v;
  for (std::size_t l = 1; l < net.layers.size(); ++l)
    squares += ks.sum_squares(net.layers[l].W, net.layers[l].fan_in * net.layers[l].fan_out);
  return static_cast<double>(l2) * squares;
}

// Copies rows `rows` of X into ws: the targets, and the input normalised and scaled (by input_scale's
// entries, in X order over these rows, or by the dropout of `training` at `step`), dropped entries removed.
void gather_batch(const KernelSet& ks, const CsrView& X, const std::int64_t* rows, index_t n, const float* input_scale,
                  const AutoencoderTraining* training, std::int64_t step, AeWorkspace& ws) {
  ws.in_indptr.assign(1, 0);
  ws.t_indptr.assign(1, 0);
  ws.in_indices.clear();
  ws.in_values.clear();
  ws.t_indices.clear();
  ws.t_values.clear();
  const NoiseKeys keys(training ? training->seed : 0, step);
  const bool drop = training && training->dropout > 0.0f;
  const auto threshold = drop ? static_cast<std::uint64_t>(static_cast<double>(training->dropout) * 16777216.0) : 0;
  const float keep_scale = drop ? 1.0f / (1.0f - training->dropout) : 1.0f;
  std::int64_t at = 0;  // position in input_scale
  for (index_t i = 0; i < n; ++i) {
    const std::int64_t u = rows ? rows[i] : i;
    const std::int64_t p0 = X.indptr[u], p1 = X.indptr[u + 1];
    double squares = 0.0;
    for (std::int64_t p = p0; p < p1; ++p) squares += static_cast<double>(X.data[p]) * X.data[p];
    const float inv_norm = squares > 0.0 ? static_cast<float>(1.0 / std::sqrt(squares)) : 0.0f;
    const float* scale = nullptr;
    if (input_scale) {
      scale = input_scale + at;
    } else if (drop) {
      ws.scale_row.resize(static_cast<std::size_t>(p1 - p0));
      ks.dropout_row(keys.dropout(u), 1, p1 - p0, threshold, keep_scale, ws.scale_row.data());
      scale = ws.scale_row.data();
    }
    at += p1 - p0;
    for (std::int64_t p = p0; p < p1; ++p) {
      ws.t_indices.push_back(X.indices[p]);
      ws.t_values.push_back(X.data[p]);
      const float v = X.data[p] * inv_norm * (scale ? scale[p - p0] : 1.0f);
      if (v != 0.0f) {
        ws.in_indices.push_back(X.indices[p]);
        ws.in_values.push_back(v);
      }
    }
    ws.in_indptr.push_back(static_cast<std::int64_t>(ws.in_indices.size()));
    ws.t_indptr.push_back(static_cast<std::int64_t>(ws.t_indices.size()));
  }
}

void check_csr(const AutoencoderNet& net, const CsrView& X) {
  require(X.cols == net.n_items(), "X has " + std::to_string(X.cols) + " columns but the model has " +
                                       std::to_string(net.n_items()) + " items");
  require(X.indptr[0] == 0, "X.indptr must start at 0");
  for (index_t r = 0; r < X.rows; ++r) require(X.indptr[r + 1] >= X.indptr[r], "X.indptr must be non-decreasing");
  for (std::int64_t p = 0; p < X.indptr[X.rows]; ++p)
    if (X.indices[p] < 0 || X.indices[p] >= X.cols)  // the message is built only on failure: this runs per entry
      require(false, "X.indices holds column " + std::to_string(X.indices[p]) + ", outside [0, " +
                         std::to_string(X.cols) + ")");
}

}  // namespace

Activation AutoencoderNet::activation(std::size_t l) const {
  if (l + 1 == layers.size() || (variational && l + 1 == n_encoder)) return Activation::Identity;
  return Activation::Tanh;
}

void validate(const AutoencoderNet& net) {
  const std::size_t L = net.layers.size();
  require(net.n_encoder >= 1 && net.n_encoder < L, "the network needs at least one encoder and one decoder layer");
  for (std::size_t l = 1; l < L; ++l)
    require(net.layers[l].fan_in == net.layers[l - 1].fan_out || (net.variational && l == net.n_encoder),
            "layer " + std::to_string(l) + " has fan_in " + std::to_string(net.layers[l].fan_in) +
                " but layer " + std::to_string(l - 1) + " gives " + std::to_string(net.layers[l - 1].fan_out));
  if (net.variational)
    require(net.layers[net.n_encoder - 1].fan_out == 2 * net.layers[net.n_encoder].fan_in,
            "the VAE's last encoder layer must give 2 x latent outputs (mean and log-variance)");
  require(net.layers.back().fan_out == net.n_items(), "the last layer must give one logit per item (" +
                                                          std::to_string(net.n_items()) + ")");
}

void autoencoder_forward(const KernelSet& ks, const AutoencoderNet& net, const CsrView& X, float* out, int n_threads) {
  validate(net);
  check_csr(net, X);
  if (X.rows == 0) return;
  AeWorkspace ws(net, false);
  gather_batch(ks, X, nullptr, X.rows, nullptr, nullptr, 0, ws);
  forward_batch(ks, net, ws, X.rows, nullptr, X.cols, false, n_threads);
  std::memcpy(out, ws.acts.back().data(), sizeof(float) * static_cast<std::size_t>(X.rows * net.n_items()));
}

AutoencoderLoss autoencoder_loss_and_gradients(const KernelSet& ks, const AutoencoderNet& net, const CsrView& X,
                                               const float* input_scale, const float* eps, float beta, float l2,
                                               const std::vector<float*>& coef_grads,
                                               const std::vector<float*>& intercept_grads, int n_threads) {
  validate(net);
  check_csr(net, X);
  require(X.rows >= 1, "need at least one row");
  AeWorkspace ws(net, true);
  gather_batch(ks, X, nullptr, X.rows, input_scale, nullptr, 0, ws);
  forward_batch(ks, net, ws, X.rows, net.variational ? eps : nullptr, X.cols, true, n_threads);
  AutoencoderLoss out = loss_and_backward(ks, net, ws, X.rows, net.variational ? eps : nullptr, beta, l2, n_threads);
  out.loss += l2_term(ks, net, ws, l2);
  for (std::size_t l = 0; l < net.layers.size(); ++l) {
    const Layer& layer = net.layers[l];
    const std::size_t len = static_cast<std::size_t>(layer.fan_in * layer.fan_out);
    if (l == 0) {
      std::fill(coef_grads[0], coef_grads[0] + len, 0.0f);
      for (std::size_t g = 0; g < ws.touched.ids.size(); ++g)
        std::memcpy(coef_grads[0] + static_cast<index_t>(ws.touched.ids[g]) * layer.fan_out,
                    ws.touched_grad.data() + g * static_cast<std::size_t>(layer.fan_out),
                    sizeof(float) * static_cast<std::size_t>(layer.fan_out));
    } else {
      std::memcpy(coef_grads[l], ws.grad_w[l].data(), sizeof(float) * len);
    }
    std::memcpy(intercept_grads[l], ws.grad_b[l].data(), sizeof(float) * static_cast<std::size_t>(layer.fan_out));
  }
  return out;
}

void autoencoder_noise(const KernelSet& ks, const AutoencoderTraining& training, std::int64_t step,
                       const std::int64_t* rows, const CsrView& X, index_t latent, float* input_scale, float* eps) {
  const NoiseKeys keys(training.seed, step);
  const auto threshold = static_cast<std::uint64_t>(static_cast<double>(training.dropout) * 16777216.0);
  const float keep_scale = 1.0f / (1.0f - training.dropout);
  for (index_t i = 0; i < X.rows; ++i) {
    const std::int64_t p0 = X.indptr[i], n = X.indptr[i + 1] - p0;
    if (training.dropout > 0.0f)
      ks.dropout_row(keys.dropout(rows[i]), 1, n, threshold, keep_scale, input_scale + p0);
    else
      std::fill(input_scale + p0, input_scale + p0 + n, 1.0f);
    gaussian_row(keys.gauss(rows[i]), latent, eps + i * latent);
  }
}

EpochResult autoencoder_train_epoch(const KernelSet& ks, const AutoencoderNet& net, Optimizer& opt,
                                    const AutoencoderTraining& training, const CsrView& X, const std::int64_t* order,
                                    index_t n_order, index_t batch_size, int n_threads) {
  validate(net);
  check_csr(net, X);
  require(batch_size >= 1, "batch_size must be at least 1");
  require(training.dropout >= 0.0f && training.dropout < 1.0f, "dropout must be in [0, 1)");
  for (index_t i = 0; i < n_order; ++i)
    if (order[i] < 0 || order[i] >= X.rows)
      require(false, "order holds row " + std::to_string(order[i]) + ", outside [0, " + std::to_string(X.rows) + ")");
  const std::size_t L = net.layers.size();
  require(opt.state1.size() == 2 * L && opt.state2.size() == 2 * L, "Adam needs both moments of every array");
  const int threads = resolve_threads(n_threads);
  const index_t k = net.latent();
  AeWorkspace ws(net, true);
  EpochResult result;
  for (index_t b0 = 0; b0 < n_order; b0 += batch_size) {
    const index_t n = std::min(batch_size, n_order - b0);
    const std::int64_t step = opt.adam_t;  // steps before this one: the noise stream and the annealing
    const double anneal = training.anneal_steps > 0
                              ? static_cast<double>(step) / static_cast<double>(training.anneal_steps)
                              : static_cast<double>(training.beta_max);
    const auto beta = static_cast<float>(std::min(anneal, static_cast<double>(training.beta_max)));
    gather_batch(ks, X, order + b0, n, nullptr, &training, step, ws);
    const float* eps = nullptr;
    if (net.variational) {
      const NoiseKeys keys(training.seed, step);
      ws.eps.resize(static_cast<std::size_t>(n * k));
      parallel_for(0, n, n * k < 4096 ? 1 : threads,
                   [&](std::int64_t i) { gaussian_row(keys.gauss(order[b0 + i]), k, ws.eps.data() + i * k); });
      eps = ws.eps.data();
    }
    forward_batch(ks, net, ws, n, eps, X.cols, true, threads);
    AutoencoderLoss loss = loss_and_backward(ks, net, ws, n, eps, beta, training.l2, threads);
    loss.loss += l2_term(ks, net, ws, training.l2);
    if (!std::isfinite(loss.loss)) {
      result.diverged = true;
      break;
    }
    const UpdateRule rule = opt.next_step();
    update_touched_rows(ks, rule, ws.touched, net.layers[0].W, net.layers[0].fan_out, ws.touched_grad.data(),
                        opt.state1[0], opt.state2[0], threads);
    for (std::size_t l = 0; l < L; ++l) {
      const Layer& layer = net.layers[l];
      if (l > 0)
        update_dense(ks, rule, layer.W, ws.grad_w[l].data(), opt.state1[l], opt.state2[l],
                     layer.fan_in * layer.fan_out, threads);
      update_dense(ks, rule, layer.b, ws.grad_b[l].data(), opt.state1[L + l], opt.state2[L + l], layer.fan_out,
                   threads);
    }
    result.loss_sum += loss.loss * static_cast<double>(n);
    result.rows += n;
  }
  return result;
}

}  // namespace fastrec
