#include "mlp.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "gemm.h"
#include "parallel.h"
#include "sparse.h"

namespace fastrec {

namespace {

// Rows per forward() chunk: bounds the activations' memory for large inputs and is still a GEMM with
// enough rows to run at full speed.
constexpr index_t kForwardChunk = 2048;
// Element count per thread below which an element-wise pass stays on one thread.
constexpr index_t kElementsPerThread = 1 << 15;
// How many scattered weight rows ahead to prefetch (measured 4, 8, 16, 32 on the 10^7-column benchmark:
// 4 and 8 best; further ahead evicts rows before their use).
constexpr index_t kPrefetchRows = 4;

float stable_sigmoid(float z) {
  if (z >= 0.0f) return 1.0f / (1.0f + std::exp(-z));
  const float e = std::exp(z);
  return e / (1.0f + e);
}

// Output activation in place on logits (n x k).
void output_activation(Activation out, float* Z, index_t n, index_t k) {
  if (out == Activation::Logistic) {
    for (index_t i = 0; i < n * k; ++i) Z[i] = stable_sigmoid(Z[i]);
  } else if (out == Activation::Softmax) {
    for (index_t i = 0; i < n; ++i) {
      float* z = Z + i * k;
      float m = z[0];
      for (index_t j = 1; j < k; ++j) m = std::max(m, z[j]);
      double s = 0.0;
      for (index_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(z[j]) - m);
      for (index_t j = 0; j < k; ++j) z[j] = static_cast<float>(std::exp(static_cast<double>(z[j]) - m) / s);
    }
  }
}

// Sum over the batch of the data loss (before 1/n) and dZ = P - Y (before 1/n). See docs/DESIGN.md.
double output_loss(Activation out, const float* Z, const float* Y, index_t n, index_t k, float* dZ) {
  double loss = 0.0;
  if (out == Activation::Identity) {
    for (index_t i = 0; i < n * k; ++i) {
      const float d = Z[i] - Y[i];
      loss += static_cast<double>(d) * d;
      dZ[i] = d;
    }
    return loss / (2.0 * static_cast<double>(k));  // scikit-learn's squared_loss averages over outputs too
  }
  if (out == Activation::Logistic) {
    for (index_t i = 0; i < n * k; ++i) {
      const double z = Z[i];
      loss += std::max(z, 0.0) - Y[i] * z + std::log1p(std::exp(-std::fabs(z)));
      dZ[i] = stable_sigmoid(Z[i]) - Y[i];
    }
    return loss;
  }
  for (index_t i = 0; i < n; ++i) {  // softmax
    const float* z = Z + i * k;
    const float* y = Y + i * k;
    double m = z[0];
    for (index_t j = 1; j < k; ++j) m = std::max(m, static_cast<double>(z[j]));
    double s = 0.0;
    for (index_t j = 0; j < k; ++j) s += std::exp(z[j] - m);
    const double lse = m + std::log(s);
    for (index_t j = 0; j < k; ++j) {
      loss += y[j] * (lse - z[j]);
      dZ[i * k + j] = static_cast<float>(std::exp(z[j] - lse)) - y[j];
    }
  }
  return loss;
}

void update_dense(const KernelSet& ks, const UpdateRule& rule, float* p, const float* g, float* s1, float* s2,
                  index_t len, int n_threads) {
  const index_t chunk = kElementsPerThread;
  const index_t chunks = (len + chunk - 1) / chunk;
  parallel_for(0, chunks, n_threads, [&](std::int64_t c) {
    const index_t begin = c * chunk, count = std::min(chunk, len - begin);
    ks.update(rule, p + begin, g + begin, s1 + begin, s2 ? s2 + begin : nullptr, count);
  });
}

// Buffers reused across the minibatches of one call.
struct Workspace {
  std::vector<std::vector<float>> acts;  // acts[l] = output of layer l-1 (acts[L] = logits); acts[0] unused
  std::vector<float> delta, delta_prev, grad_w, grad_b, x_batch, y_batch, touched_grad;
  std::vector<double> row_squares;
  std::vector<std::int64_t> indptr;
  std::vector<std::int32_t> indices;
  std::vector<float> data;
  TouchedRows touched;

  // A CSR first layer never gets a dense gradient buffer: its size would grow with the column count.
  Workspace(const Network& net, index_t rows, bool sparse_input) {
    const std::size_t L = net.layers.size();
    acts.resize(L + 1);
    index_t widest = 0, largest = 0;
    for (std::size_t l = 0; l < L; ++l) {
      acts[l + 1].resize(static_cast<std::size_t>(rows * net.layers[l].fan_out));
      widest = std::max(widest, net.layers[l].fan_out);
      if (l > 0 || !sparse_input) largest = std::max(largest, net.layers[l].fan_in * net.layers[l].fan_out);
    }
    delta.resize(static_cast<std::size_t>(rows * widest));
    delta_prev.resize(delta.size());
    grad_w.resize(static_cast<std::size_t>(largest));
    grad_b.resize(static_cast<std::size_t>(widest));
  }
};

// Copies rows order[0:n] of X (and Y) into the workspace; returns the batch as an Input.
Input gather_batch(const Input& X, const float* Y, index_t n_out, const std::int64_t* order, index_t n,
                   Workspace& ws) {
  Input b;
  b.rows = n;
  b.cols = X.cols;
  ws.y_batch.resize(static_cast<std::size_t>(n * n_out));
  for (index_t i = 0; i < n; ++i)
    std::memcpy(ws.y_batch.data() + i * n_out, Y + order[i] * n_out, sizeof(float) * n_out);
  if (!X.sparse) {
    ws.x_batch.resize(static_cast<std::size_t>(n * X.cols));
    for (index_t i = 0; i < n; ++i)
      std::memcpy(ws.x_batch.data() + i * X.cols, X.dense + order[i] * X.ld, sizeof(float) * X.cols);
    b.dense = ws.x_batch.data();
    b.ld = X.cols;
    return b;
  }
  ws.indptr.assign(1, 0);
  ws.indices.clear();
  ws.data.clear();
  for (index_t i = 0; i < n; ++i) {
    const index_t p0 = X.csr.indptr[order[i]], p1 = X.csr.indptr[order[i] + 1];
    ws.indices.insert(ws.indices.end(), X.csr.indices + p0, X.csr.indices + p1);
    ws.data.insert(ws.data.end(), X.csr.data + p0, X.csr.data + p1);
    ws.indptr.push_back(static_cast<std::int64_t>(ws.indices.size()));
  }
  b.sparse = true;
  b.csr = CsrView{ws.indptr.data(), ws.indices.data(), ws.data.data(), n, X.cols};
  return b;
}

// Fills ws.acts[1..L] for the batch: hidden activations, then the output layer's logits.
void forward_logits(const KernelSet& ks, const Network& net, const Input& X, Workspace& ws, int n_threads) {
  const std::size_t L = net.layers.size();
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = net.layers[l];
    Epilogue e;
    e.bias = layer.b;
    e.act = l + 1 == L ? Activation::Identity : net.hidden;
    float* out = ws.acts[l + 1].data();
    if (l == 0 && X.sparse) {
      csr_matmul(ks, X.csr, layer.W, layer.fan_out, layer.fan_out, out, layer.fan_out, &e, n_threads);
    } else {
      const float* in = l == 0 ? X.dense : ws.acts[l].data();
      const index_t ld_in = l == 0 ? X.ld : layer.fan_in;
      sgemm(ks, false, false, X.rows, layer.fan_out, layer.fan_in, in, ld_in, layer.W, layer.fan_out, out,
            layer.fan_out, &e, n_threads);
    }
  }
}

// Receives each layer's gradient during backward, last layer first. For a CSR first layer, grad_w holds
// only the touched rows (touched != nullptr), in the order of touched->ids.
struct GradientSink {
  virtual void layer(std::size_t l, const float* grad_w, const float* grad_b, const TouchedRows* touched) = 0;
  virtual ~GradientSink() = default;
};

// Loss of the batch (data loss / n + L2 term) and backward pass feeding sink. Uses ws.acts from forward_logits.
double backward(const KernelSet& ks, const Network& net, const Input& X, const float* Y, float alpha,
                Workspace& ws, GradientSink& sink, int n_threads) {
  const std::size_t L = net.layers.size();
  const index_t n = X.rows;
  const index_t n_out = net.layers.back().fan_out;
  const float inv_n = 1.0f / static_cast<float>(n);
  double loss = output_loss(net.out, ws.acts[L].data(), Y, n, n_out, ws.delta.data()) / static_cast<double>(n);

  if (X.sparse) group_by_column(X.csr, ws.touched);
  if (alpha != 0.0f) {  // L2 on weights before this step's update (a CSR first layer's: below, touched rows only)
    double squares = 0.0;
    for (std::size_t l = X.sparse ? 1 : 0; l < L; ++l)
      squares += ks.sum_squares(net.layers[l].W, net.layers[l].fan_in * net.layers[l].fan_out);
    loss += 0.5 * alpha * squares / static_cast<double>(n);
  }

  for (std::size_t l = L; l-- > 0;) {
    const Layer& layer = net.layers[l];
    const float* D = ws.delta.data();
    // db = mean of D over rows (rows in order: deterministic).
    float* gb = ws.grad_b.data();
    std::fill(gb, gb + layer.fan_out, 0.0f);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < layer.fan_out; ++j) gb[j] += D[i * layer.fan_out + j];
    for (index_t j = 0; j < layer.fan_out; ++j) gb[j] *= inv_n;

    if (l == 0 && X.sparse) {
      const auto touched = static_cast<index_t>(ws.touched.ids.size());
      ws.touched_grad.resize(static_cast<std::size_t>(touched * layer.fan_out));
      float* G = ws.touched_grad.data();
      csr_transpose_matmul(ks, ws.touched, D, layer.fan_out, layer.fan_out, G, layer.fan_out, n_threads);
      // One pass over the scattered weight rows: G = (X^T D + alpha W) / n and each row's part of the L2
      // term. Split over threads like the update that follows (same static chunks), so each thread then
      // finds its rows of W in its own cache; the per-row squares are summed in row order (reproducible).
      ws.row_squares.assign(static_cast<std::size_t>(touched), 0.0);
      const index_t w = layer.fan_out;
      parallel_for(0, touched, static_cast<index_t>(touched * w) < kElementsPerThread ? 1 : n_threads,
                   [&](std::int64_t g) {
                     if (g + kPrefetchRows < touched) {  // scattered over a table that may dwarf the caches
                       const float* ahead = layer.W + static_cast<index_t>(ws.touched.ids[g + kPrefetchRows]) * w;
                       for (index_t line = 0; line < w; line += 16) __builtin_prefetch(ahead + line);
                     }
                     const float* wr = layer.W + static_cast<index_t>(ws.touched.ids[g]) * w;
                     if (alpha != 0.0f) ws.row_squares[g] = ks.sum_squares(wr, w);
                     float* row = G + g * w;
                     for (index_t j = 0; j < w; ++j) row[j] = (row[j] + alpha * wr[j]) * inv_n;
                   });
      double squares = 0.0;
      for (double r : ws.row_squares) squares += r;
      loss += 0.5 * alpha * squares / static_cast<double>(n);
      sink.layer(l, G, gb, &ws.touched);
      continue;
    }
    // dW = (A^T D + alpha W) / n, A = this layer's input.
    const float* A = l == 0 ? X.dense : ws.acts[l].data();
    const index_t lda = l == 0 ? X.ld : layer.fan_in;
    Epilogue eg;
    eg.scale = inv_n;
    eg.addend = alpha != 0.0f ? layer.W : nullptr;
    eg.ld_addend = layer.fan_out;
    eg.addend_scale = alpha * inv_n;
    sgemm(ks, true, false, layer.fan_in, layer.fan_out, n, A, lda, D, layer.fan_out, ws.grad_w.data(),
          layer.fan_out, &eg, n_threads);
    if (l > 0) {  // D_prev = (D W^T) * act'(A), with W before its update
      Epilogue ed;
      ed.mul = ws.acts[l].data();
      ed.ld_mul = layer.fan_in;
      ed.mul_act = net.hidden;
      sgemm(ks, false, true, n, layer.fan_in, layer.fan_out, D, layer.fan_out, layer.W, layer.fan_out,
            ws.delta_prev.data(), layer.fan_in, &ed, n_threads);
    }
    sink.layer(l, ws.grad_w.data(), gb, nullptr);
    if (l > 0) std::swap(ws.delta, ws.delta_prev);
  }
  return loss;
}

struct CopySink : GradientSink {
  const Network& net;
  const std::vector<float*>& coef_grads;
  const std::vector<float*>& intercept_grads;
  CopySink(const Network& n, const std::vector<float*>& c, const std::vector<float*>& i)
      : net(n), coef_grads(c), intercept_grads(i) {}
  void layer(std::size_t l, const float* gw, const float* gb, const TouchedRows* touched) override {
    const Layer& layer = net.layers[l];
    const std::size_t row_bytes = sizeof(float) * static_cast<std::size_t>(layer.fan_out);
    if (touched) {
      std::memset(coef_grads[l], 0, row_bytes * static_cast<std::size_t>(layer.fan_in));
      for (std::size_t g = 0; g < touched->ids.size(); ++g)
        std::memcpy(coef_grads[l] + static_cast<index_t>(touched->ids[g]) * layer.fan_out, gw + g * layer.fan_out,
                    row_bytes);
    } else {
      std::memcpy(coef_grads[l], gw, row_bytes * static_cast<std::size_t>(layer.fan_in));
    }
    std::memcpy(intercept_grads[l], gb, row_bytes);
  }
};

struct UpdateSink : GradientSink {
  const KernelSet& ks;
  const Network& net;
  const Optimizer& opt;
  UpdateRule rule;
  int n_threads;
  UpdateSink(const KernelSet& k, const Network& n, const Optimizer& o, float lr, int threads)
      : ks(k), net(n), opt(o), n_threads(threads) {
    rule.adam = o.solver == Solver::Adam;
    rule.nesterov = o.nesterov;
    rule.lr = lr;
    rule.momentum = o.momentum;
    rule.beta_1 = o.beta_1;
    rule.beta_2 = o.beta_2;
    rule.epsilon = o.epsilon;
  }
  float* state(const std::vector<float*>& s, std::size_t i) const { return s.empty() ? nullptr : s[i]; }
  void layer(std::size_t l, const float* gw, const float* gb, const TouchedRows* touched) override {
    const Layer& layer = net.layers[l];
    const std::size_t L = net.layers.size();
    float *w1 = state(opt.state1, l), *w2 = state(opt.state2, l);
    if (touched) {  // lazy: only the rows this batch touched, each row owned by one thread
      const index_t w = layer.fan_out;
      parallel_for(0, static_cast<std::int64_t>(touched->ids.size()),
                   touched->ids.size() * w < static_cast<std::size_t>(kElementsPerThread) ? 1 : n_threads,
                   [&](std::int64_t g) {
                     const index_t off = static_cast<index_t>(touched->ids[g]) * w;
                     if (g + kPrefetchRows < static_cast<std::int64_t>(touched->ids.size())) {  // scattered rows
                       const index_t next = static_cast<index_t>(touched->ids[g + kPrefetchRows]) * w;
                       for (index_t line = 0; line < w; line += 16) {  // 16 floats = one 64-byte line
                         __builtin_prefetch(layer.W + next + line, 1);
                         __builtin_prefetch(w1 + next + line, 1);
                         if (w2) __builtin_prefetch(w2 + next + line, 1);
                       }
                     }
                     ks.update(rule, layer.W + off, gw + g * w, w1 + off, w2 ? w2 + off : nullptr, w);
                   });
    } else {
      update_dense(ks, rule, layer.W, gw, w1, w2, layer.fan_in * layer.fan_out, n_threads);
    }
    update_dense(ks, rule, layer.b, gb, state(opt.state1, L + l), state(opt.state2, L + l), layer.fan_out,
                 n_threads);
  }
};

}  // namespace

void forward(const KernelSet& ks, const Network& net, const Input& X, float* out, int n_threads) {
  const std::size_t L = net.layers.size();
  const index_t n_out = net.layers.back().fan_out;
  Workspace ws(net, std::min(X.rows, kForwardChunk), X.sparse);
  for (index_t r0 = 0; r0 < X.rows; r0 += kForwardChunk) {
    Input chunk = X;
    chunk.rows = std::min(kForwardChunk, X.rows - r0);
    if (X.sparse) {
      chunk.csr.indptr = X.csr.indptr + r0;  // indices stay absolute: indptr offsets index the full arrays
      chunk.csr.rows = chunk.rows;
    } else {
      chunk.dense = X.dense + r0 * X.ld;
    }
    forward_logits(ks, net, chunk, ws, n_threads);
    float* dst = out + r0 * n_out;
    std::memcpy(dst, ws.acts[L].data(), sizeof(float) * static_cast<std::size_t>(chunk.rows * n_out));
    output_activation(net.out, dst, chunk.rows, n_out);
  }
}

double loss_and_gradients(const KernelSet& ks, const Network& net, const Input& X, const float* Y, float alpha,
                          const std::vector<float*>& coef_grads, const std::vector<float*>& intercept_grads,
                          int n_threads) {
  Workspace ws(net, X.rows, X.sparse);
  forward_logits(ks, net, X, ws, n_threads);
  CopySink sink(net, coef_grads, intercept_grads);
  return backward(ks, net, X, Y, alpha, ws, sink, n_threads);
}

double train_epoch(const KernelSet& ks, const Network& net, Optimizer& opt, const Input& X, const float* Y,
                   const std::int64_t* order, index_t n_order, index_t batch_size, float alpha, int n_threads) {
  const index_t n_out = net.layers.back().fan_out;
  Workspace ws(net, std::min(batch_size, n_order), X.sparse);
  double loss_sum = 0.0;
  for (index_t begin = 0; begin < n_order; begin += batch_size) {
    const index_t n = std::min(batch_size, n_order - begin);
    const Input batch = gather_batch(X, Y, n_out, order + begin, n, ws);
    forward_logits(ks, net, batch, ws, n_threads);
    float lr = opt.learning_rate;
    if (opt.solver == Solver::Adam) {
      ++opt.adam_t;
      const double t = static_cast<double>(opt.adam_t);
      lr = static_cast<float>(opt.learning_rate * std::sqrt(1.0 - std::pow(opt.beta_2, t)) /
                              (1.0 - std::pow(opt.beta_1, t)));
    }
    UpdateSink sink(ks, net, opt, lr, n_threads);
    loss_sum += backward(ks, net, batch, ws.y_batch.data(), alpha, ws, sink, n_threads) * static_cast<double>(n);
  }
  return loss_sum;
}

}  // namespace fastrec
