// The multi-layer perceptron: forward, loss and gradients, and minibatch training with SGD or Adam.
// Parameters and optimizer state live in caller-owned float32 arrays (the Python layer owns them); these
// functions read and update them in place. Mathematics: docs/DESIGN.md (scikit-learn's conventions).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"

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
};

// Dense rows (ld floats apart) or CSR; rows x cols.
struct Input {
  const float* dense = nullptr;
  index_t ld = 0;
  CsrView csr;
  bool sparse = false;
  index_t rows = 0, cols = 0;
};

enum class Solver { Sgd, Adam };

struct Optimizer {
  Solver solver = Solver::Adam;
  float learning_rate = 1e-3f;
  float momentum = 0.9f;
  bool nesterov = true;
  float beta_1 = 0.9f, beta_2 = 0.999f, epsilon = 1e-8f;
  // Per parameter array, in the order W_0..W_{L-1}, b_0..b_{L-1}: SGD velocity / Adam first moment in
  // state1, Adam second moment in state2 (empty for SGD).
  std::vector<float*> state1, state2;
  std::int64_t adam_t = 0;  // Adam steps taken so far
};

// out (X.rows x n_out) = the network's output after the output activation.
void forward(const KernelSet& ks, const Network& net, const Input& X, float* out, int n_threads);

// Loss of the whole input as one batch, and dense gradients (for CSR input, dW_0 is zero outside touched rows).
double loss_and_gradients(const KernelSet& ks, const Network& net, const Input& X, const float* Y, float alpha,
                          const std::vector<float*>& coef_grads, const std::vector<float*>& intercept_grads,
                          int n_threads);

// One epoch of minibatches X[order[i : i + batch_size]]; returns sum(batch_loss * batch_rows).
double train_epoch(const KernelSet& ks, const Network& net, Optimizer& opt, const Input& X, const float* Y,
                   const std::int64_t* order, index_t n_order, index_t batch_size, float alpha, int n_threads);

}  // namespace fastrec
