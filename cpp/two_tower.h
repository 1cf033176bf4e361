// The two-tower model (docs/DESIGN.md, "The two-tower model"): a user tower and an item tower, each a field
// model (fields.h) with one key column whose MLP ends in a vector of out_dim floats; the score of a pair is
// the inner product of the two vectors, optionally L2-normalised, divided by a temperature. Losses: sampled
// softmax over the batch's items (log-Q corrected, mixed with uniform extra negatives, accidental hits
// removed), BPR and binary cross-entropy over sampled negatives, MSE on ratings. Parameters and optimizer
// state are caller-owned arrays, updated in place.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "fields.h"
#include "kernels/kernels.h"
#include "mlp.h"

namespace fastrec {

enum class TowerLoss { Softmax, Bpr, Bce, Mse };

struct TwoTowerModel {
  FieldModel user, item;  // towers (FieldModel::tower), outputs of the same width
  bool normalize = false;  // score = <u/|u|, v/|v|> / temperature (else <u, v> / temperature)
  float temperature = 1.0f;
  index_t dim() const { return user.mlp.layers.back().fan_out; }
};

// How a batch is trained.
//   Softmax: each positive (u, i) against the batch's items plus `negatives` extra items drawn uniformly per
//     batch (mixed negative sampling); logit_c = score(u, c) - log(n q[c] + m / n_items) when item_prob q is
//     given (n positives, m extra: the expected count of item c among the batch's candidates; Yi et al.,
//     RecSys 2019); a candidate holding the positive's item, other than the positive itself, is left out.
//   Bpr: mean over the `negatives` sampled negatives j of each positive of softplus(score_j - score_i).
//   Bce: log loss of sigmoid(score), label 1 for positives (their sample weight) and 0 for `negatives`
//     sampled negatives each (weight 1), mean over all rows.
//   Mse: 0.5 w (score - y)^2.
// Bpr and Bce draw negatives with `sampler` (fields.h: uniform or by cdf, never a seen item).
struct TowerTraining {
  TowerLoss loss = TowerLoss::Softmax;
  int negatives = 0;
  const float* item_prob = nullptr;  // n_items sampling probabilities for the log-Q correction, or none
  NegativeSampler sampler;           // n_items and seed always; seen lists for Bpr and Bce
};

// Positive pairs (user row, item row), targets y (Mse) and optional sample weights.
struct TowerPairs {
  const std::int32_t* users = nullptr;
  const std::int32_t* items = nullptr;
  const float* y = nullptr;
  const float* weight = nullptr;
  index_t rows = 0;
};

// The model's arrays and the pairs' rows checked against each other; throws std::invalid_argument.
void validate(const TwoTowerModel& model);
void validate(const TwoTowerModel& model, const TowerPairs& pairs);

// out (n x dim) = each key's tower vector, normalised when model.normalize, times `scale`.
void tower_vectors(const KernelSet& ks, const TwoTowerModel& model, bool user_side, const std::int32_t* keys,
                   index_t n, float scale, float* out, int n_threads);

// Loss of all pairs as one batch (negatives given: `extra` m items for Softmax, n x negatives for Bpr/Bce,
// row-major) and dense gradients of every array (zero outside touched rows), for tests. grads: per tower,
// table_grads (one per field), coef_grads, intercept_grads.
struct TowerGradients {
  std::vector<float*> tables, coefs, intercepts;
};
double two_tower_loss_and_gradients(const KernelSet& ks, const TwoTowerModel& model, const TowerTraining& training,
                                    const TowerPairs& pairs, const std::int32_t* negatives, index_t n_negatives,
                                    float alpha, const TowerGradients& user_grads, const TowerGradients& item_grads,
                                    int n_threads);

// One epoch over pairs[order[i : i + batch_size]]; opt_user / opt_item hold each tower's MLP state
// (Optimizer::state1/2) and share one step count (opt_user.adam_t on return). See EpochResult.
EpochResult two_tower_train_epoch(const KernelSet& ks, TwoTowerModel& model, const TowerTraining& training,
                                  Optimizer& opt_user, Optimizer& opt_item, const TowerPairs& pairs,
                                  const std::int64_t* order, index_t n_order, index_t batch_size, float alpha,
                                  std::uint64_t epoch, const StopCheck& stop, int n_threads);

}  // namespace fastrec
