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
constexpr index_t kMaxGradientParts = 1 << 22;  // floats of chunk partials (16 MB); above, one product per layer
// Below this many multiply-adds per row block a second thread costs more than it saves (as in sgemm).
constexpr double kMinFmasPerBlock = 1 << 20;
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
      output_loss(net.out, ws.acts[L].data(), Y, w, X.rows, net.layers.back().fan_out, ws.deltas[L - 1].data()) / denominator;
  if (skipped && !std::isfinite(data_loss)) {
    *skipped = true;
    return data_loss;
  }
  Backward pass(ks, net, X, alpha, denominator, ws);
  pass.products(n_threads);
  return data_loss + pass.apply(sink, n_threads);
}

}  // namespace

void layer_gemm(const KernelSet& ks, const Network& net, const Layer& layer, bool trans_a, bool trans_b, index_t M,
                index_t N, index_t K, const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc,
                const Epilogue* epilogue, int n_threads) {
  // Row-major A (forward, deltas): bf16_gemm_rows, the same bits without A's MR panels.
  if (net.bf16 && layer.fan_out > 1)
    bf16_gemm_rows(ks, net.bf16_native, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
  else
    sgemm(ks, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
}

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

void CopySink::weight_rows(std::size_t l, index_t r0, index_t rows, const float* grad, int) {
  const index_t fo = net.layers[l].fan_out;
  std::memcpy(coef_grads[l] + r0 * fo, grad, sizeof(float) * static_cast<std::size_t>(rows * fo));
}

void CopySink::touched_rows(const TouchedRows& touched, const float* grad, int) {
  const Layer& layer = net.layers[0];
  const std::size_t row_bytes = sizeof(float) * static_cast<std::size_t>(layer.fan_out);
  std::memset(coef_grads[0], 0, row_bytes * static_cast<std::size_t>(layer.fan_in));
  for (std::size_t g = 0; g < touched.ids.size(); ++g)
    std::memcpy(coef_grads[0] + static_cast<index_t>(touched.ids[g]) * layer.fan_out, grad + g * layer.fan_out,
                row_bytes);
}

void CopySink::bias(std::size_t l, const float* grad) {
  std::memcpy(intercept_grads[l], grad, sizeof(float) * static_cast<std::size_t>(net.layers[l].fan_out));
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
  index_t weights = 0, biases = 0;
  for (std::size_t l = 0; l < L; ++l) {
    acts[l + 1].resize(static_cast<std::size_t>(rows * net.layers[l].fan_out));
    if (l > 0 || !sparse_input) weights += net.layers[l].fan_in * net.layers[l].fan_out;
    biases += net.layers[l].fan_out;
  }
  if (!training) return;
  ones.assign(static_cast<std::size_t>(rows), 1.0f);
  row_ids.resize(static_cast<std::size_t>(rows));
  for (index_t i = 0; i < rows; ++i) row_ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  deltas.resize(L);
  for (std::size_t l = 0; l < L; ++l) deltas[l].resize(static_cast<std::size_t>(rows * net.layers[l].fan_out));
  grad_w.resize(static_cast<std::size_t>(weights));
  grad_b.resize(static_cast<std::size_t>(biases));
}

int row_blocks(const Network& net, index_t n, int n_threads) {
  double fmas = 0.0;
  for (const Layer& layer : net.layers) fmas += static_cast<double>(layer.fan_in) * static_cast<double>(layer.fan_out);
  fmas *= static_cast<double>(n);
  const double blocks = std::min<double>({static_cast<double>(resolve_threads(n_threads)),
                                          static_cast<double>(ceil_div(n, kGradientChunkRows)), fmas / kMinFmasPerBlock});
  return static_cast<int>(std::max(1.0, blocks));
}

std::pair<index_t, index_t> block_rows(index_t n, int blocks, std::int64_t b) {
  const index_t chunks = ceil_div(n, kGradientChunkRows);
  const index_t c0 = chunks * b / blocks, c1 = chunks * (b + 1) / blocks;
  return {c0 * kGradientChunkRows, std::min(n, c1 * kGradientChunkRows)};
}

void forward_rows(const KernelSet& ks, const Network& net, const Input& X, MlpWorkspace& ws, index_t r0, index_t r1,
                  int n_threads) {
  const std::size_t L = net.layers.size();
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = net.layers[l];
    Epilogue e;
    e.bias = layer.b;
    e.act = l + 1 == L ? Activation::Identity : net.hidden;
    float* out = ws.acts[l + 1].data() + r0 * layer.fan_out;
    if (l == 0 && X.sparse) {
      CsrView rows = X.csr;  // indices stay absolute: indptr offsets index the full arrays
      rows.indptr += r0;
      rows.rows = r1 - r0;
      csr_matmul(ks, rows, layer.W, layer.fan_out, layer.fan_out, out, layer.fan_out, &e, n_threads);
    } else {
      const float* in = l == 0 ? X.dense : ws.acts[l].data();
      const index_t ld_in = l == 0 ? X.ld : layer.fan_in;
      layer_gemm(ks, net, layer, false, false, r1 - r0, layer.fan_out, layer.fan_in, in + r0 * ld_in, ld_in, layer.W, layer.fan_out,
            out, layer.fan_out, &e, n_threads);
    }
  }
}

const float* forward_row(const KernelSet& ks, const Network& net, const float* x, MlpWorkspace& ws) {
  const std::size_t L = net.layers.size();
  const float* in = x;
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = net.layers[l];
    Epilogue e;
    e.bias = layer.b;
    e.act = l + 1 == L ? Activation::Identity : net.hidden;
    float* out = ws.acts[l + 1].data();
    sgemm_row(ks, layer.fan_out, layer.fan_in, in, layer.W, layer.fan_out, out, &e);
    in = out;
  }
  return in;
}

void forward_logits(const KernelSet& ks, const Network& net, const Input& X, MlpWorkspace& ws, int n_threads) {
  const int blocks = row_blocks(net, X.rows, n_threads);
  if (blocks == 1) return forward_rows(ks, net, X, ws, 0, X.rows, n_threads);
  parallel_for(0, blocks, blocks, [&](std::int64_t b) {
    const auto [r0, r1] = block_rows(X.rows, blocks, b);
    forward_rows(ks, net, X, ws, r0, r1, 1);
  });
}

Backward::Backward(const KernelSet& ks, const Network& net, const Input& X, float alpha, double denominator,
                   MlpWorkspace& ws)
    : ks_(ks), net_(net), X_(X), ws_(ws), alpha_(alpha), denominator_(denominator),
      inv_n_(static_cast<float>(1.0 / denominator)), chunks_(ceil_div(X.rows, kGradientChunkRows)) {
  const std::size_t L = net.layers.size();
  w_at_.resize(L), b_at_.resize(L), part_at_.resize(L), part_size_.resize(L);
  index_t w_total = 0, b_total = 0;
  for (std::size_t l = 0; l < L; ++l) {
    const Layer& layer = net.layers[l];
    const index_t w = l == 0 && X.sparse ? 0 : layer.fan_in * layer.fan_out;
    w_at_[l] = w_total, b_at_[l] = b_total, part_at_[l] = parts_, part_size_[l] = w + layer.fan_out;
    w_total += w, b_total += layer.fan_out, parts_ += chunks_ * part_size_[l];
  }
  chunked_ = chunks_ > 1 && parts_ <= kMaxGradientParts;
  if (chunked_) ws.grad_parts.resize(static_cast<std::size_t>(parts_));
}

Epilogue Backward::weight_epilogue(std::size_t l) const {  // dW = (Aᵀ D + alpha W) / n
  Epilogue e;
  e.scale = inv_n_;
  e.addend = alpha_ != 0.0f ? net_.layers[l].W : nullptr;
  e.ld_addend = net_.layers[l].fan_out;
  e.addend_scale = alpha_ * inv_n_;
  return e;
}

const float* Backward::input(std::size_t l) const { return l == 0 ? X_.dense : ws_.acts[l].data(); }

index_t Backward::input_ld(std::size_t l) const { return l == 0 ? X_.ld : net_.layers[l].fan_in; }

void Backward::layer_rows(std::size_t l, index_t r0, index_t r1, int n_threads) {
  const Layer& layer = net_.layers[l];
  const index_t fi = layer.fan_in, fo = layer.fan_out;
  const float* D = ws_.deltas[l].data();
  const float* A = input(l);
  const index_t lda = input_ld(l);
  for (index_t c0 = r0; chunked_ && weight_gradients && c0 < r1; c0 += kGradientChunkRows) {
    const index_t rows = std::min(kGradientChunkRows, r1 - c0);
    float* part = ws_.grad_parts.data() + part_at_[l] + c0 / kGradientChunkRows * part_size_[l];
    if (!(l == 0 && X_.sparse))
      layer_gemm(ks_, net_, layer, true, false, fi, fo, rows, A + c0 * lda, lda, D + c0 * fo, fo, part, fo, nullptr, 1);
    ks_.row_sum(ws_.ones.data(), ws_.row_ids.data(), rows, D + c0 * fo, fo, fo, part + part_size_[l] - fo);
  }
  if (l > 0) {  // D of layer l-1 = (D Wᵀ) * act'(A)
    Epilogue ed;
    ed.mul = ws_.acts[l].data() + r0 * fi;
    ed.ld_mul = fi;
    ed.mul_act = net_.hidden;
    float* D_prev = ws_.deltas[l - 1].data() + r0 * fi;
    if (fo == 1) {  // a one-output layer: an outer product (as a K = 1 product it costs a kernel call per tile)
      for (index_t r = r0; r < r1; ++r)
        for (index_t j = 0; j < fi; ++j) D_prev[(r - r0) * fi + j] = D[r] * layer.W[j];
      ks_.epilogue(D_prev, fi, static_cast<int>(r1 - r0), static_cast<int>(fi), 0, 0, ed);
    } else {
      layer_gemm(ks_, net_, layer, false, true, r1 - r0, fi, fo, D + r0 * fo, fo, layer.W, fo, D_prev, fi, &ed,
                 n_threads);
    }
  } else if (dx_) {
    layer_gemm(ks_, net_, layer, false, true, r1 - r0, dx_cols_, fo, D + r0 * fo, fo, layer.W, fo, dx_ + r0 * lddx_, lddx_, nullptr,
          n_threads);
  }
}

void Backward::products(int n_threads, const BlockPrologue& prologue, float* dx, index_t lddx, index_t dx_cols) {
  dx_ = dx, lddx_ = lddx, dx_cols_ = dx_cols;
  const std::size_t L = net_.layers.size();
  const index_t n = X_.rows;
  if (chunked_) {  // each thread takes its block of whole chunks down through every layer
    const int blocks = row_blocks(net_, n, n_threads), inner = blocks == 1 ? n_threads : 1;
    parallel_for(0, blocks, blocks, [&](std::int64_t b) {
      const auto [r0, r1] = block_rows(n, blocks, b);
      if (prologue) prologue(r0, r1, inner);
      for (std::size_t l = L; l-- > 0;) layer_rows(l, r0, r1, inner);
    });
    return;
  }
  if (prologue) prologue(0, n, n_threads);
  for (std::size_t l = L; l-- > 0;) {  // one product per layer, each split over the threads
    const Layer& layer = net_.layers[l];
    const float* D = ws_.deltas[l].data();
    // db = mean of D over rows (rows in order: deterministic), summed in the ISA kernel's registers.
    float* gb = ws_.grad_b.data() + b_at_[l];
    if (weight_gradients) ks_.row_sum(ws_.ones.data(), ws_.row_ids.data(), n, D, layer.fan_out, layer.fan_out, gb);
    for (index_t j = 0; weight_gradients && j < layer.fan_out; ++j) gb[j] *= inv_n_;
    if (weight_gradients && !(l == 0 && X_.sparse)) {
      const Epilogue eg = weight_epilogue(l);
      layer_gemm(ks_, net_, layer, true, false, layer.fan_in, layer.fan_out, n, input(l), input_ld(l), D, layer.fan_out,
            ws_.grad_w.data() + w_at_[l], layer.fan_out, &eg, n_threads);
    }
    layer_rows(l, 0, n, n_threads);
  }
}

double Backward::apply(GradientSink& sink, int n_threads, std::int64_t extra_tasks,
                       const std::function<void(std::int64_t)>& extra) {
  const std::size_t L = net_.layers.size();
  double squares = 0.0;  // L2 on weights before this step's update (a CSR first layer's: touched rows only)
  if (alpha_ != 0.0f)
    for (std::size_t l = X_.sparse ? 1 : 0; l < L; ++l)
      squares += ks_.sum_squares(net_.layers[l].W, net_.layers[l].fan_in * net_.layers[l].fan_out);
  if (!chunked_) {
    for (std::size_t l = L; l-- > 0;) {
      if (!(l == 0 && X_.sparse)) sink.weight_rows(l, 0, net_.layers[l].fan_in, ws_.grad_w.data() + w_at_[l], n_threads);
      sink.bias(l, ws_.grad_b.data() + b_at_[l]);
    }
    parallel_for<true>(0, extra_tasks, n_threads, extra);
  } else {
    // The sums, then the sink, in tasks of up to kUpdateChunk floats of dW rows or one layer's db (rows == 0),
    // handed out dynamically (each task's result does not depend on the thread that runs it).
    struct SumTask {
      std::size_t l;
      index_t r0, rows;
    };
    std::vector<SumTask> tasks;
    for (std::size_t l = 0; l < L; ++l) {
      const index_t fo = net_.layers[l].fan_out, dw_rows = l == 0 && X_.sparse ? 0 : net_.layers[l].fan_in;
      const index_t step = std::max<index_t>(1, kUpdateChunk / fo);
      for (index_t r0 = 0; r0 < dw_rows; r0 += step) tasks.push_back({l, r0, std::min(step, dw_rows - r0)});
      tasks.push_back({l, 0, 0});
    }
    const auto all = extra_tasks + static_cast<std::int64_t>(tasks.size());
    parallel_for<true>(0, all, extra_tasks == 0 && parts_ < kElementsPerThread ? 1 : n_threads, [&](std::int64_t t) {
          if (t < extra_tasks) return extra(t);
          const SumTask& task = tasks[static_cast<std::size_t>(t - extra_tasks)];
          const index_t fo = net_.layers[task.l].fan_out, ld = part_size_[task.l];
          const float* part = ws_.grad_parts.data() + part_at_[task.l];
          if (task.rows == 0) {
            float* gb = ws_.grad_b.data() + b_at_[task.l];
            ks_.row_sum(ws_.ones.data(), ws_.row_ids.data(), chunks_, part + ld - fo, ld, fo, gb);
            for (index_t j = 0; j < fo; ++j) gb[j] *= inv_n_;
            sink.bias(task.l, gb);
            return;
          }
          float* gw = ws_.grad_w.data() + w_at_[task.l] + task.r0 * fo;
          ks_.row_sum(ws_.ones.data(), ws_.row_ids.data(), chunks_, part + task.r0 * fo, ld, task.rows * fo, gw);
          ks_.epilogue(gw, fo, static_cast<int>(task.rows), static_cast<int>(fo), task.r0, 0, weight_epilogue(task.l));
          sink.weight_rows(task.l, task.r0, task.rows, gw, 1);
        });
  }
  if (X_.sparse) {  // the first layer's rows that the batch touched
    const Layer& layer = net_.layers[0];
    group_by_column(X_.csr, ws_.touched);
    ws_.touched_grad.resize(ws_.touched.ids.size() * static_cast<std::size_t>(layer.fan_out));
    squares += touched_rows_gradient(ks_, ws_.touched, ws_.deltas[0].data(), layer.fan_out, layer.W, layer.fan_out,
                                     alpha_, inv_n_, ws_.touched_grad.data(), ws_.row_squares, n_threads);
    sink.touched_rows(ws_.touched, ws_.touched_grad.data(), n_threads);
  }
  return 0.5 * alpha_ * squares / denominator_;
}

namespace {
float* state_at(const std::vector<float*>& state, std::size_t i) { return state.empty() ? nullptr : state[i]; }
}  // namespace

void UpdateSink::weight_rows(std::size_t l, index_t r0, index_t rows, const float* grad, int n_threads) {
  const index_t at = r0 * net.layers[l].fan_out;
  float *s1 = state_at(opt.state1, l), *s2 = state_at(opt.state2, l);
  update_dense(ks, rule, net.layers[l].W + at, grad, s1 ? s1 + at : nullptr, s2 ? s2 + at : nullptr,
               rows * net.layers[l].fan_out, n_threads);
}

void UpdateSink::touched_rows(const TouchedRows& touched, const float* grad, int n_threads) {
  // lazy: only the rows this batch touched, each row owned by one thread
  update_touched_rows(ks, rule, touched, net.layers[0].W, net.layers[0].fan_out, grad, state_at(opt.state1, 0),
                      state_at(opt.state2, 0), n_threads);
}

void UpdateSink::bias(std::size_t l, const float* grad) {
  const std::size_t L = net.layers.size();
  update_dense(ks, rule, net.layers[l].b, grad, state_at(opt.state1, L + l), state_at(opt.state2, L + l),
               net.layers[l].fan_out, 1);
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
    UpdateSink sink(ks, net, opt, opt.next_step());
    bool skipped = false;
    const double loss = backward(ks, net, batch, buffers.y.data(), w, denominator, alpha, ws, sink, &skipped, threads);
    if (!end_batch(result, opt, step_before, skipped, loss, n)) break;
    batch_threads.done(n);
  }
  return result;
}

}  // namespace fastrec
