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
// A weight gradient Aᵀ·D over more batch rows than this is summed from fixed chunks of rows: each thread
// multiplies whole chunks (a contiguous range of rows, mostly ones it wrote itself in the row-split products
// before) and the partial products are added in chunk order. The chunks depend only on the batch size, so
// the sum does not depend on the thread count.
constexpr index_t kGradientChunkRows = 256;
constexpr index_t kMaxGradientParts = 1 << 22;  // floats of partial products (16 MB); above, one product
// Floats per task of a dense optimizer step. A weight matrix that both threads just read (D·Wᵀ) sits in both
// caches and each write first invalidates the other copy: splitting the step overlaps those waits.
constexpr index_t kUpdateChunk = 1 << 13;


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

// Sum over the batch of the data loss (before the 1/denominator) and dZ = P - Y, each row times its weight w[i]
// when w is given (scikit-learn's sample_weight). See docs/DESIGN.md.
double output_loss(Activation out, const float* Z, const float* Y, const float* w, index_t n, index_t k, float* dZ) {
  double loss = 0.0;
  if (out == Activation::Identity) {
    for (index_t i = 0; i < n * k; ++i) {
      const float d = Z[i] - Y[i];
      const float wi = w ? w[i / k] : 1.0f;
      loss += static_cast<double>(wi) * d * d;
      dZ[i] = wi * d;
    }
    return loss / (2.0 * static_cast<double>(k));  // scikit-learn's squared_loss averages over outputs too
  }
  if (out == Activation::Logistic) {
    for (index_t i = 0; i < n * k; ++i) {
      const double z = Z[i];
      const float wi = w ? w[i / k] : 1.0f;
      loss += wi * (std::max(z, 0.0) - Y[i] * z + std::log1p(std::exp(-std::fabs(z))));
      dZ[i] = wi * (stable_sigmoid(Z[i]) - Y[i]);
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
    const float wi = w ? w[i] : 1.0f;
    for (index_t j = 0; j < k; ++j) {
      loss += wi * y[j] * (lse - z[j]);
      dZ[i * k + j] = wi * (static_cast<float>(std::exp(z[j] - lse)) - y[j]);
    }
  }
  return loss;
}

// The minibatch copies of X and Y.
struct BatchBuffers {
  std::vector<float> x, y, w, data;
  std::vector<std::int64_t> indptr;
  std::vector<std::int32_t> indices;
};

// Copies rows order[0:n] of X (and Y) into the workspace; returns the batch as an Input.
Input gather_batch(const Input& X, const float* Y, const float* W, index_t n_out, const std::int64_t* order, index_t n,
                   BatchBuffers& ws) {
  Input b;
  b.rows = n;
  b.cols = X.cols;
  ws.y.resize(static_cast<std::size_t>(n * n_out));
  for (index_t i = 0; i < n; ++i)
    std::memcpy(ws.y.data() + i * n_out, Y + order[i] * n_out, sizeof(float) * n_out);
  ws.w.resize(W ? static_cast<std::size_t>(n) : 0);
  for (index_t i = 0; W && i < n; ++i) ws.w[static_cast<std::size_t>(i)] = W[order[i]];
  if (!X.sparse) {
    ws.x.resize(static_cast<std::size_t>(n * X.cols));
    for (index_t i = 0; i < n; ++i)
      std::memcpy(ws.x.data() + i * X.cols, X.dense + order[i] * X.ld, sizeof(float) * X.cols);
    b.dense = ws.x.data();
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


// The denominator of a batch's mean loss and gradients: its row count, or the sum of its sample weights.
double batch_denominator(const float* w, index_t n) {
  if (!w) return static_cast<double>(n);
  double total = 0.0;
  for (index_t i = 0; i < n; ++i) total += w[i];
  return total;
}

// Loss of the batch: data loss / denominator from the logits in ws.acts, then backprop. With `skipped`, a NaN
// or infinite data loss sets *skipped and returns before backprop, so the sink applies no update.
double backward(const KernelSet& ks, const Network& net, const Input& X, const float* Y, const float* w, double denominator,
                float alpha, MlpWorkspace& ws, GradientSink& sink, bool* skipped, int n_threads) {
  const std::size_t L = net.layers.size();
  const double data_loss =
      output_loss(net.out, ws.acts[L].data(), Y, w, X.rows, net.layers.back().fan_out, ws.delta.data()) / denominator;
  if (skipped && !std::isfinite(data_loss)) {
    *skipped = true;
    return data_loss;
  }
  return data_loss + backprop(ks, net, X, alpha, denominator, ws, sink, n_threads);
}

}  // namespace

void update_dense(const KernelSet& ks, const UpdateRule& rule, float* p, const float* g, float* s1, float* s2,
                  index_t len, int n_threads) {
  const index_t chunks = (len + kUpdateChunk - 1) / kUpdateChunk;
  parallel_for(0, chunks, n_threads, [&](std::int64_t c) {
    const index_t begin = c * kUpdateChunk, count = std::min(kUpdateChunk, len - begin);
    ks.update(rule, p + begin, g + begin, s1 + begin, s2 ? s2 + begin : nullptr, count);
  });
}

float stable_sigmoid(float z) {
  if (z >= 0.0f) return 1.0f / (1.0f + std::exp(-z));
  const float e = std::exp(z);
  return e / (1.0f + e);
}

void CopySink::layer(std::size_t l, const float* gw, const float* gb, const TouchedRows* touched) {
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

UpdateRule Optimizer::next_step() {
  UpdateRule rule;
  rule.lr = learning_rate;
  rule.momentum = momentum;
  rule.nesterov = nesterov;
  rule.beta_1 = beta_1;
  rule.beta_2 = beta_2;
  rule.epsilon = epsilon;
  switch (solver) {
    case Solver::Sgd: rule.kind = UpdateKind::Sgd; break;
    case Solver::Adagrad: rule.kind = UpdateKind::Adagrad; break;
    case Solver::Adam: {
      rule.kind = UpdateKind::Adam;
      ++adam_t;
      const double t = static_cast<double>(adam_t);
      rule.lr = static_cast<float>(learning_rate * std::sqrt(1.0 - std::pow(static_cast<double>(beta_2), t)) /
                                   (1.0 - std::pow(static_cast<double>(beta_1), t)));
      break;
    }
  }
  return rule;
}

MlpWorkspace::MlpWorkspace(const Network& net, index_t rows, bool sparse_input, bool training) {
  const std::size_t L = net.layers.size();
  acts.resize(L + 1);
  index_t widest = 0, largest = 0;
  for (std::size_t l = 0; l < L; ++l) {
    acts[l + 1].resize(static_cast<std::size_t>(rows * net.layers[l].fan_out));
    widest = std::max(widest, net.layers[l].fan_out);
    if (l > 0 || !sparse_input) largest = std::max(largest, net.layers[l].fan_in * net.layers[l].fan_out);
  }
  if (!training) return;
  ones.assign(static_cast<std::size_t>(rows), 1.0f);
  row_ids.resize(static_cast<std::size_t>(rows));
  for (index_t i = 0; i < rows; ++i) row_ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  delta.resize(static_cast<std::size_t>(rows * widest));
  delta_prev.resize(delta.size());
  grad_w.resize(static_cast<std::size_t>(largest));
  grad_b.resize(static_cast<std::size_t>(widest));
}

void forward_logits(const KernelSet& ks, const Network& net, const Input& X, MlpWorkspace& ws, int n_threads) {
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

namespace {
// ws.grad_w = epilogue(Aᵀ D) for one layer (A: n x fan_in, D: n x fan_out), see kGradientChunkRows.
void weight_gradient(const KernelSet& ks, const Layer& layer, index_t n, const float* A, index_t lda, const float* D,
                     const Epilogue& e, MlpWorkspace& ws, int n_threads) {
  const index_t fi = layer.fan_in, fo = layer.fan_out;
  const index_t chunks = (n + kGradientChunkRows - 1) / kGradientChunkRows, size = fi * fo;
  if (chunks <= 1 || chunks * size > kMaxGradientParts) {
    sgemm(ks, true, false, fi, fo, n, A, lda, D, fo, ws.grad_w.data(), fo, &e, n_threads);
    return;
  }
  ws.grad_parts.resize(static_cast<std::size_t>(chunks * size));
  parallel_for(0, chunks, n_threads, [&](std::int64_t c) {
    const index_t r0 = c * kGradientChunkRows, rows = std::min(kGradientChunkRows, n - r0);
    sgemm(ks, true, false, fi, fo, rows, A + r0 * lda, lda, D + r0 * fo, fo, ws.grad_parts.data() + c * size, fo,
          nullptr, 1);
  });
  // The sum over chunks in chunk order (row_sum over the partials, one block of rows of dW per task; the
  // chunk ids 0..chunks-1 are the first of the row ids, chunks < n).
  const index_t rows_per_task = std::max<index_t>(1, kElementsPerThread / fo);
  parallel_for(0, (fi + rows_per_task - 1) / rows_per_task, size < kElementsPerThread ? 1 : n_threads,
               [&](std::int64_t t) {
                 const index_t r0 = t * rows_per_task, rows = std::min(rows_per_task, fi - r0);
                 float* out = ws.grad_w.data() + r0 * fo;
                 ks.row_sum(ws.ones.data(), ws.row_ids.data(), chunks, ws.grad_parts.data() + r0 * fo, size,
                            rows * fo, out);
                 ks.epilogue(out, fo, static_cast<int>(rows), static_cast<int>(fo), r0, 0, e);
               });
}
}  // namespace

double backprop(const KernelSet& ks, const Network& net, const Input& X, float alpha, double denominator,
                MlpWorkspace& ws, GradientSink& sink, int n_threads, float* dx, index_t lddx, index_t dx_cols) {
  const std::size_t L = net.layers.size();
  const index_t n = X.rows;
  const float inv_n = static_cast<float>(1.0 / denominator);
  double squares = 0.0;  // L2 on weights before this step's update (a CSR first layer's: touched rows only)
  if (alpha != 0.0f)
    for (std::size_t l = X.sparse ? 1 : 0; l < L; ++l)
      squares += ks.sum_squares(net.layers[l].W, net.layers[l].fan_in * net.layers[l].fan_out);

  for (std::size_t l = L; l-- > 0;) {
    const Layer& layer = net.layers[l];
    const float* D = ws.delta.data();
    // db = mean of D over rows (rows in order: deterministic), summed in the ISA kernel's registers.
    float* gb = ws.grad_b.data();
    ks.row_sum(ws.ones.data(), ws.row_ids.data(), n, D, layer.fan_out, layer.fan_out, gb);
    for (index_t j = 0; j < layer.fan_out; ++j) gb[j] *= inv_n;

    if (l == 0 && X.sparse) {
      group_by_column(X.csr, ws.touched);
      ws.touched_grad.resize(ws.touched.ids.size() * static_cast<std::size_t>(layer.fan_out));
      squares += touched_rows_gradient(ks, ws.touched, D, layer.fan_out, layer.W, layer.fan_out, alpha, inv_n,
                                       ws.touched_grad.data(), ws.row_squares, n_threads);
      sink.layer(l, ws.touched_grad.data(), gb, &ws.touched);
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
    weight_gradient(ks, layer, n, A, lda, D, eg, ws, n_threads);
    if (l > 0) {  // D_prev = (D W^T) * act'(A), with W before its update
      Epilogue ed;
      ed.mul = ws.acts[l].data();
      ed.ld_mul = layer.fan_in;
      ed.mul_act = net.hidden;
      sgemm(ks, false, true, n, layer.fan_in, layer.fan_out, D, layer.fan_out, layer.W, layer.fan_out,
            ws.delta_prev.data(), layer.fan_in, &ed, n_threads);
    } else if (dx) {  // the input gradient, for embedding fields in front of the network
      sgemm(ks, false, true, n, dx_cols, layer.fan_out, D, layer.fan_out, layer.W, layer.fan_out, dx, lddx, nullptr,
            n_threads);
    }
    sink.layer(l, ws.grad_w.data(), gb, nullptr);
    if (l > 0) std::swap(ws.delta, ws.delta_prev);
  }
  return 0.5 * alpha * squares / denominator;
}

void UpdateSink::layer(std::size_t l, const float* gw, const float* gb, const TouchedRows* touched) {
  const Layer& layer = net.layers[l];
  const std::size_t L = net.layers.size();
  auto state = [](const std::vector<float*>& s, std::size_t i) { return s.empty() ? nullptr : s[i]; };
  float *w1 = state(opt.state1, l), *w2 = state(opt.state2, l);
  if (touched)  // lazy: only the rows this batch touched, each row owned by one thread
    update_touched_rows(ks, rule, *touched, layer.W, layer.fan_out, gw, w1, w2, n_threads);
  else
    update_dense(ks, rule, layer.W, gw, w1, w2, layer.fan_in * layer.fan_out, n_threads);
  update_dense(ks, rule, layer.b, gb, state(opt.state1, L + l), state(opt.state2, L + l), layer.fan_out, n_threads);
}

void forward(const KernelSet& ks, const Network& net, const Input& X, float* out, int n_threads) {
  const std::size_t L = net.layers.size();
  const index_t n_out = net.layers.back().fan_out;
  MlpWorkspace ws(net, std::min(X.rows, kForwardChunk), X.sparse, false);
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

double loss_and_gradients(const KernelSet& ks, const Network& net, const Input& X, const float* Y, const float* w,
                          float alpha, const std::vector<float*>& coef_grads,
                          const std::vector<float*>& intercept_grads, int n_threads) {
  MlpWorkspace ws(net, X.rows, X.sparse, true);
  forward_logits(ks, net, X, ws, n_threads);
  CopySink sink(net, coef_grads, intercept_grads);
  const double denominator = batch_denominator(w, X.rows);
  require(denominator > 0.0, "sample_weight: the weights sum to zero");
  return backward(ks, net, X, Y, w, denominator, alpha, ws, sink, nullptr, n_threads);
}

bool end_batch(EpochResult& result, Optimizer& opt, std::int64_t step_before, bool skipped, double loss, index_t n) {
  if (skipped) opt.adam_t = step_before;
  if (!std::isfinite(loss)) {
    result.diverged = true;
    return false;
  }
  result.loss_sum += loss * static_cast<double>(n);
  result.rows += n;
  return true;
}

EpochResult train_epoch(const KernelSet& ks, const Network& net, Optimizer& opt, const Input& X, const float* Y,
                        const float* weights, const std::int64_t* order, index_t n_order, index_t batch_size,
                        float alpha, const StopCheck& stop, int n_threads) {
  const index_t n_out = net.layers.back().fan_out;
  MlpWorkspace ws(net, std::min(batch_size, n_order), X.sparse, true);
  BatchBuffers buffers;
  EpochResult result;
  BatchThreads batch_threads(n_threads);
  for (index_t begin = 0; begin < n_order; begin += batch_size) {
    if (stop && stop(begin)) break;
    const int threads = batch_threads.next();
    const index_t n = std::min(batch_size, n_order - begin);
    const Input batch = gather_batch(X, Y, weights, n_out, order + begin, n, buffers);
    const float* w = weights ? buffers.w.data() : nullptr;
    const double denominator = batch_denominator(w, n);
    if (denominator == 0.0) {  // every weight of the batch is zero: nothing to learn from it, no step
      end_batch(result, opt, opt.adam_t, false, 0.0, n);
      continue;
    }
    forward_logits(ks, net, batch, ws, threads);
    const std::int64_t step_before = opt.adam_t;
    UpdateSink sink(ks, net, opt, opt.next_step(), threads);
    bool skipped = false;
    const double loss = backward(ks, net, batch, buffers.y.data(), w, denominator, alpha, ws, sink, &skipped, threads);
    if (!end_batch(result, opt, step_before, skipped, loss, n)) break;
    batch_threads.done(n);
  }
  return result;
}

}  // namespace fastrec
