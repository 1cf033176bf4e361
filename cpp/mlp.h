// The multi-layer perceptron: forward, loss and gradients, and minibatch training with SGD, Adagrad or Adam.
// Parameters and optimizer state live in caller-owned float32 arrays (the Python layer owns them); these
// functions read and update them in place. Mathematics: docs/DESIGN.md (scikit-learn's conventions).
#pragma once
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"
#include "sparse.h"

namespace fastrec {

struct Layer {
  float* W;  // fan_in x fan_out, row-major
  float* b;  // fan_out
  index_t fan_in, fan_out;
};

struct Network {
  std::vector<Layer> layers;
  Activation hidden = Activation::Relu;
  Activation out = Activation::Identity;  // identity (squared error), logistic (log loss), softmax
  // Mixed precision (docs/DESIGN.md, "bf16 training of the field model"): every product of a layer with more
  // than one output (forward, weight gradient, delta / input gradient) through bf16_gemm (operands rounded to
  // bf16, float32 sums); weights, biases, activations, gradients and optimizer state stay float32. A one-output
  // layer stays float32 (matrix-vector products: memory bound, nothing to gain). bf16_native: the AVX512-BF16
  // kernel, else the emulated one (isa.h resolve_bf16_kernel).
  bool bf16 = false;
  bool bf16_native = false;
};

// op(A) op(B) of one of layer's products: sgemm, or bf16_gemm under the rule of Network::bf16.
void layer_gemm(const KernelSet& ks, const Network& net, const Layer& layer, bool trans_a, bool trans_b, index_t M,
                index_t N, index_t K, const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc,
                const Epilogue* epilogue, int n_threads);

// Dense rows (ld floats apart) or CSR; rows x cols.
struct Input {
  const float* dense = nullptr;
  index_t ld = 0;
  CsrView csr;
  bool sparse = false;
  index_t rows = 0, cols = 0;
};

enum class Solver { Sgd, Adagrad, Adam };

struct Optimizer {
  Solver solver = Solver::Adam;
  float learning_rate = 1e-3f;
  float momentum = 0.9f;
  bool nesterov = true;
  float beta_1 = 0.9f, beta_2 = 0.999f, epsilon = 1e-8f;
  // Per parameter array, in the order W_0..W_{L-1}, b_0..b_{L-1}: SGD velocity / Adagrad sum of squares /
  // Adam first moment in state1, Adam second moment in state2 (empty otherwise).
  std::vector<float*> state1, state2;
  std::int64_t adam_t = 0;  // Adam steps taken so far

  // Advances the step counter (Adam) and returns the update rule of this step for the dense parameters.
  UpdateRule next_step();
};

// out (X.rows x n_out) = the network's output after the output activation.
void forward(const KernelSet& ks, const Network& net, const Input& X, float* out, int n_threads);

// Loss of the whole input as one batch, and dense gradients (for CSR input, dW_0 is zero outside touched rows).
// w: optional sample weights (X.rows,), scikit-learn's sample_weight: each row's loss and output gradient times
// its weight, means over the sum of the weights instead of the row count (which must then be positive).
double loss_and_gradients(const KernelSet& ks, const Network& net, const Input& X, const float* Y, const float* w,
                          float alpha, const std::vector<float*>& coef_grads,
                          const std::vector<float*>& intercept_grads, int n_threads);

// One epoch of minibatches X[order[i : i + batch_size]] (see EpochResult for how it may end early), with the
// optional sample weights as in loss_and_gradients per batch; a batch whose weights are all zero is skipped
// (no optimizer step; its loss counts as 0).
EpochResult train_epoch(const KernelSet& ks, const Network& net, Optimizer& opt, const Input& X, const float* Y,
                        const float* weights, const std::int64_t* order, index_t n_order, index_t batch_size,
                        float alpha, const StopCheck& stop, int n_threads);

// ---- Building blocks shared with the field model (fields.cpp) ----

// Books a finished training batch into `result`; false when its loss was not finite (training stops there).
// A skipped batch (backward returned before any update) gives back its optimizer step; a loss that overflows
// only through the L2 term was applied, and still stops training.
bool end_batch(EpochResult& result, Optimizer& opt, std::int64_t step_before, bool skipped, double loss, index_t n);

// 1 / (1 + e^-z) without overflow for any finite z.
float stable_sigmoid(float z);

// Buffers reused across the minibatches of one call.
struct MlpWorkspace {
  std::vector<std::vector<float>> acts;  // acts[l] = output of layer l-1 (acts[L] = logits); acts[0] unused
  std::vector<std::vector<float>> deltas;  // deltas[l] = dLoss/d(layer l's output before activation), times d
  std::vector<float> grad_w, grad_b, touched_grad;  // grad_*: one slot per layer
  std::vector<double> row_squares;
  std::vector<float> ones;             // rows x 1.0f, and the row ids 0..rows-1: sums over rows (bias
  std::vector<std::int32_t> row_ids;   // gradients, weight-gradient chunks) run as the row_sum kernel
  std::vector<float> grad_parts;       // a weight gradient's partial products, one per chunk of batch rows
  TouchedRows touched;
  // Gradient buffers only when training; a CSR first layer never gets a dense one (its size would grow with
  // the column count).
  MlpWorkspace(const Network& net, index_t rows, bool sparse_input, bool training);
};

// Fills ws.acts[1..L] for the batch: hidden activations, then the output layer's logits.
void forward_logits(const KernelSet& ks, const Network& net, const Input& X, MlpWorkspace& ws, int n_threads);

// Receives each layer's gradients during backward, after every read of W that backward makes. Dense weight
// gradients arrive as row ranges of dW, possibly several ranges of one layer at once from different threads
// (disjoint rows); a CSR first layer's as the rows its batch touched, in the order of touched.ids.
struct GradientSink {
  virtual void weight_rows(std::size_t l, index_t r0, index_t rows, const float* grad, int n_threads) = 0;
  virtual void touched_rows(const TouchedRows& touched, const float* grad, int n_threads) = 0;
  virtual void bias(std::size_t l, const float* grad) = 0;
  virtual ~GradientSink() = default;
};

// Copies each layer's gradient into caller arrays (dense; a CSR first layer's untouched rows are zero).
struct CopySink : GradientSink {
  const Network& net;
  const std::vector<float*>& coef_grads;
  const std::vector<float*>& intercept_grads;
  CopySink(const Network& n, const std::vector<float*>& c, const std::vector<float*>& i)
      : net(n), coef_grads(c), intercept_grads(i) {}
  void weight_rows(std::size_t l, index_t r0, index_t rows, const float* grad, int n_threads) override;
  void touched_rows(const TouchedRows& touched, const float* grad, int n_threads) override;
  void bias(std::size_t l, const float* grad) override;
};

// Applies an optimizer step to each part of a layer as its gradient arrives.
struct UpdateSink : GradientSink {
  const KernelSet& ks;
  const Network& net;
  const Optimizer& opt;
  UpdateRule rule;
  UpdateSink(const KernelSet& k, const Network& n, const Optimizer& o, const UpdateRule& r)
      : ks(k), net(n), opt(o), rule(r) {}
  void weight_rows(std::size_t l, index_t r0, index_t rows, const float* grad, int n_threads) override;
  void touched_rows(const TouchedRows& touched, const float* grad, int n_threads) override;
  void bias(std::size_t l, const float* grad) override;
};

// One optimizer step on a dense parameter array of len floats, split over threads in fixed chunks.
void update_dense(const KernelSet& ks, const UpdateRule& rule, float* p, const float* g, float* s1, float* s2,
                  index_t len, int n_threads);

// Row-parallel passes. A batch of more than kGradientChunkRows rows is cut into fixed chunks of that many
// rows; each weight gradient is a sum of per-chunk partial products, added in chunk order, so the sum does not
// depend on the thread count. Each thread takes a block of whole chunks through every layer, forward and
// backward: a layer's rows stay in the cache of the thread that wrote them, the small layers and the bias
// sums are split too, and the threads meet once per pass instead of once per product.
constexpr index_t kGradientChunkRows = 256;
// The number of row blocks of n rows: one per thread, each of whole chunks; 1 for a single chunk (its
// products are split over the threads instead) or a batch too small to keep two threads busy.
int row_blocks(const Network& net, index_t n, int n_threads);
// Rows [r0, r1) of block b of `blocks` over n rows: whole chunks, as evenly as they divide.
std::pair<index_t, index_t> block_rows(index_t n, int blocks, std::int64_t b);
// Rows [r0, r1) of ws.acts[1..L] (the forward pass of those rows).
void forward_rows(const KernelSet& ks, const Network& net, const Input& X, MlpWorkspace& ws, index_t r0, index_t r1,
                  int n_threads);

// forward_rows of one dense row x (net.layers[0].fan_in floats) on the calling thread, each layer a row
// product with its bias and activation (sgemm_row): the same numbers, without sgemm's dispatch. Returns the
// output row (ws.acts[L]).
const float* forward_row(const KernelSet& ks, const Network& net, const float* x, MlpWorkspace& ws);

// Run by Backward::products at the start of each block of rows [r0, r1) (the whole batch, on n_threads, when
// it is one block): fills those rows of ws.acts[1..L] and ws.deltas[L-1], so that the forward pass, the
// loss and the backward pass of a block run on one thread without waiting for the others.
using BlockPrologue = std::function<void(index_t r0, index_t r1, int n_threads)>;

// A batch's backward pass from ws.deltas[L-1] = dLoss/dlogits * d, d = `denominator` of the mean (the row
// count, or the sum of the sample weights; the 1/d is applied here), in two steps with W read before any
// update: products() computes every gradient into the workspace, apply() sums the chunks' partials and hands
// the gradients to the sink. Between them a caller may look at the loss and drop the step.
class Backward {
 public:
  Backward(const KernelSet& ks, const Network& net, const Input& X, float alpha, double denominator, MlpWorkspace& ws);
  // If dx is given, also writes the first dx_cols columns (the inputs that pass a gradient on) of the input
  // gradient dx = D_0 W_0ᵀ (times d, like the deltas; dense input only).
  void products(int n_threads, const BlockPrologue& prologue = nullptr, float* dx = nullptr, index_t lddx = 0,
                index_t dx_cols = 0);
  // Returns the L2 term 0.5 * alpha * ||W||^2 / d of the loss (a CSR first layer: touched rows only).
  // extra(i) for i < extra_tasks: the caller's work, independent of the sink's, run in the same parallel
  // region as the chunk sums (handed out first, to whichever thread is free).
  double apply(GradientSink& sink, int n_threads, std::int64_t extra_tasks = 0,
               const std::function<void(std::int64_t)>& extra = nullptr);
  // false: products() only propagates the deltas (and dx), computing no weight gradient (DP-SGD computes its
  // own from clipped deltas, cpp/private.cpp); apply() must not be called then.
  bool weight_gradients = true;

 private:
  Epilogue weight_epilogue(std::size_t l) const;
  const float* input(std::size_t l) const;  // layer l's input (x or the previous layer's activations)
  index_t input_ld(std::size_t l) const;
  // Layer l over rows [r0, r1): the chunks' partial dW and db (chunked), and D of layer l-1, or dx for l = 0.
  void layer_rows(std::size_t l, index_t r0, index_t r1, int n_threads);

  const KernelSet& ks_;
  const Network& net_;
  const Input& X_;
  MlpWorkspace& ws_;
  float alpha_;
  double denominator_;
  float inv_n_;
  index_t chunks_, parts_ = 0;
  bool chunked_ = false;  // several chunks whose partials fit kMaxGradientParts; else one product per layer
  // Layer l's dW at ws.grad_w + w_at_[l] (none for a CSR first layer: touched rows), its db at ws.grad_b +
  // b_at_[l]; chunked, chunk c's partial [dW, db] (part_size_[l] floats) at ws.grad_parts + part_at_[l] +
  // c * part_size_[l].
  std::vector<index_t> w_at_, b_at_, part_at_, part_size_;
  float* dx_ = nullptr;
  index_t lddx_ = 0, dx_cols_ = 0;
};

}  // namespace fastrec
