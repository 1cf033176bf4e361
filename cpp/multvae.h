// Mult-VAE and Mult-DAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018;
// docs/DESIGN.md, "Mult-VAE / Mult-DAE"). A user's item bag x (a CSR row) is L2-normalised, dropped out
// (training), and passed through the encoder MLP (tanh); the VAE's last encoder layer gives [mu | logvar],
// z = mu + eps * exp(logvar / 2) when training (z = mu when scoring); the DAE's gives z (tanh). The decoder MLP
// (tanh) ends in logits over all items. Loss per user: -sum_j x_j log softmax(logits)_j (+ beta KL(q(z|x) ||
// N(0, I)) for the VAE), averaged over the batch, + l2 * sum of ||W||^2 over the weight matrices (Liang's
// lam; the first layer's rows only where the batch touches them, see below). Parameters and Adam state are
// caller-owned arrays, updated in place.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels/kernels.h"
#include "mlp.h"

namespace fastrec {

struct AutoencoderNet {
  // Encoder then decoder. layers[0] (n_items x h) reads the CSR bag; the last layer gives n_items logits.
  std::vector<Layer> layers;
  std::size_t n_encoder = 0;  // encoder layers: layers[n_encoder - 1] gives [mu | logvar] (VAE) or z (DAE)
  bool variational = true;
  // Training runs the output layer's three products (logits, its weight gradient, its input gradient) in
  // bfloat16 (gemm.h bf16_gemm: operands rounded to bf16, float32 sums; the weights stay float32) when
  // bf16_output; bf16_native picks the AVX512-BF16 kernel, else the emulated one. Scoring stays float32.
  bool bf16_output = false;
  bool bf16_native = false;
  index_t n_items() const { return layers.front().fan_in; }
  index_t latent() const { return layers[n_encoder].fan_in; }
  // Layer l's output activation: identity for the logits and the VAE's [mu | logvar], tanh elsewhere.
  Activation activation(std::size_t l) const;
};

// Throws std::invalid_argument unless the layers chain as described above.
void validate(const AutoencoderNet& net);

// The training noise. Batch streams are counter based: the stream of optimizer step t is output t of the
// splitmix64 stream seeded with `seed`; a user's (data row u's) dropout key and Gaussian key are outputs
// 2u and 2u + 1 of the stream seeded with that. Draws never depend on the thread or the batch's other rows
// (reference.multvae_noise).
struct AutoencoderTraining {
  float dropout = 0.5f;          // input dropout rate (of the bag's entries)
  float beta_max = 0.2f;         // KL weight beta = min(beta_max, step / anneal_steps) (anneal_steps 0: beta_max)
  std::int64_t anneal_steps = 0;
  float l2 = 0.0f;               // loss += l2 * sum ||W||^2
  std::uint64_t seed = 0;
};

// out (X.rows x n_items) = the logits of each bag (no dropout, z = mu).
void autoencoder_forward(const KernelSet& ks, const AutoencoderNet& net, const CsrView& X, float* out, int n_threads);

// The loss of all rows of X as one batch and its gradients (dense; the first layer's rows the batch does not
// touch are zero) with given noise: input_scale (X's nnz multipliers of the normalised entries, or null for
// none) and eps (X.rows x latent, or null: z = mu). Returns (loss, mean nll, mean KL).
struct AutoencoderLoss {
  double loss = 0.0, nll = 0.0, kl = 0.0;
};
AutoencoderLoss autoencoder_loss_and_gradients(const KernelSet& ks, const AutoencoderNet& net, const CsrView& X,
                                               const float* input_scale, const float* eps, float beta, float l2,
                                               const std::vector<float*>& coef_grads,
                                               const std::vector<float*>& intercept_grads, int n_threads);

// One epoch of Adam steps over batches of rows X[order[i : i + batch_size]]. opt.state1/2: the moments of
// W_0..W_{L-1}, b_0..b_{L-1}. The first layer is updated lazily: only the rows of the items in a batch's
// (dropped-out) bags take a step, moments included (dense Adam would also move the other rows by their
// decaying moments). A batch whose loss is not finite ends the epoch before being applied (EpochResult).
EpochResult autoencoder_train_epoch(const KernelSet& ks, const AutoencoderNet& net, Optimizer& opt,
                                    const AutoencoderTraining& training, const CsrView& X, const std::int64_t* order,
                                    index_t n_order, index_t batch_size, int n_threads);

// The noise the training draws (for tests): the dropout multipliers of X's entries (nnz) and eps (rows x
// latent) of the batch of optimizer step `step` for data rows `rows` (X's rows in this order).
void autoencoder_noise(const KernelSet& ks, const AutoencoderTraining& training, std::int64_t step,
                       const std::int64_t* rows, const CsrView& X, index_t latent, float* input_scale, float* eps);

}  // namespace fastrec
