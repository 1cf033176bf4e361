// The field model (docs/DESIGN.md, "The field model"): embedding fields and dense blocks, looked up through
// key columns, pooled and concatenated in front of the MLP, an optional GMF term, MSE or BCE on one logit;
// negative sampling for implicit feedback; top-k scoring. Parameters and state are caller-owned arrays.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "kernels/kernels.h"
#include "large_array.h"
#include "aligned.h"
#include "mlp.h"

namespace fastrec {

// CSR rows of (id, weight) pairs; row q is read for every example whose key is q.
struct BagTable {
  const std::int64_t* indptr = nullptr;
  const std::int32_t* ids = nullptr;
  const float* weights = nullptr;
  index_t rows = 0;
  // Id fields (one id of weight 1 per bag; often bag q = id q) are gathered without reading indptr and
  // weights (nor ids): in a vocabulary of millions each read is a cache miss per example. Set by shape_of.
  enum class Shape { Any, OneId, Identity } shape = Shape::Any;
};

// The shape of a validated bag table (BagTable::shape).
BagTable::Shape shape_of(const BagTable& bags);

struct EmbeddingField {
  float* table = nullptr;  // vocab x dim
  index_t vocab = 0, dim = 0;
  BagTable bags;
  int key = 0;              // key column that picks the bag
  index_t offset = -1;      // first column in the MLP input, -1 for a field used only by the GMF term or wide
  bool wide = false;        // dim 1, pooled scalar added to the logit (the linear part of Wide & Deep)
  float alpha = -1.0f;      // this table's L2 weight; negative: the call's alpha
  float dropout = 0.0f;     // training only: probability that an example reads bag row 0 (the "unknown"
                            // row) instead of its own, so row 0 learns what to use for ids never seen
  float* state1 = nullptr;  // optimizer state: vocab x dim (adam m), vocab (row-wise adagrad), or none (sgd)
  float* state2 = nullptr;  // adam v
  index_t state1_size = 0;  // floats in state1, checked against the optimizer before training
  // Optional, vocab bytes: training sets touched[row] = 1 for every row it updates (never clears it), so a
  // caller combining replicas (fastrec.dask) ships only those rows instead of comparing whole tables.
  std::uint8_t* touched = nullptr;
};

// Marks the rows of `touched` in field f's touched array (if it has one): O(rows), not O(vocab).
void mark_touched(EmbeddingField& f, const TouchedRows& touched);

struct DenseBlock {
  const float* table = nullptr;  // rows x cols
  index_t rows = 0, cols = 0;
  int key = 0;
  index_t offset = 0;
};

struct GmfTerm {
  int field_u = -1, field_v = -1;  // indices into fields; -1: no GMF term
  float* w = nullptr;              // dim
  float* state1 = nullptr;
  float* state2 = nullptr;
};

struct FieldModel {
  std::vector<EmbeddingField> fields;
  std::vector<DenseBlock> dense;
  index_t width = 0;  // MLP input width
  int n_keys = 0;
  GmfTerm gmf;
  Network mlp;        // one output: the logit (mlp.out is Identity for "mse", Logistic for "bce")
  std::vector<float*> mlp_state1, mlp_state2;  // the MLP's optimizer state, as Optimizer::state1/2
  // A tower (two_tower.h): one key column, every field feeding the MLP, whose identity output layer of any
  // width is the tower's vector.
  bool tower = false;
  bool bce() const { return mlp.out == Activation::Logistic; }
};

// Examples: keys[k][r] for each key column k; targets y and optional weights.
struct Examples {
  std::vector<const std::int32_t*> keys;
  index_t rows = 0;
  const float* y = nullptr;
  const float* weight = nullptr;
};

// Negatives for implicit feedback (docs/DESIGN.md): per positive, `negatives` rows with the item key drawn
// uniformly (cdf == nullptr) or from the cumulative distribution cdf[n_items]; never an item of the user's
// sorted seen list when seen_indptr is given (64 draws at most, then the last draw).
struct NegativeSampler {
  int negatives = 0;
  int user_key = 0, item_key = 1;
  index_t n_items = 0;
  const double* cdf = nullptr;
  const std::int64_t* seen_indptr = nullptr;
  const std::int32_t* seen_items = nullptr;
  index_t seen_users = 0;  // rows of the seen lists
  std::uint64_t seed = 0;
};

// Checks the model's arrays against each other and the examples' keys against the bag tables; throws
// std::invalid_argument naming what is wrong.
void validate(const FieldModel& model);
void validate(const FieldModel& model, const Examples& examples);
// Every table (field or dense block) read through key column `key` has at least min_rows rows.
void require_key_rows(const FieldModel& model, int key, index_t min_rows, const std::string& what);
// The sampler's key columns exist in the model and its item-keyed tables cover n_items.
void validate(const FieldModel& model, const NegativeSampler& sampler);

// out[r] = prediction of example r (probability for "bce", value for "mse").
// choice: the thread choice its chunks take part in (parallel.h; nullptr: one shared by all such calls).
void field_predict(const KernelSet& ks, const FieldModel& model, const Examples& examples, float* out, int n_threads,
                   SharedThreadChoice* choice = nullptr);

// Loss of all examples as one batch and gradients (dense, zero outside touched rows), for tests.
double field_loss_and_gradients(const KernelSet& ks, const FieldModel& model, const Examples& examples, float alpha,
                                const std::vector<float*>& table_grads, float* gmf_grad,
                                const std::vector<float*>& coef_grads, const std::vector<float*>& intercept_grads,
                                int n_threads);

// One epoch over examples[order[i : i + batch_size]] (positives) plus sampled negatives; updates parameters
// and state in place; opt.state1/2 are the MLP's (model.mlp_state*) and opt.adam_t is advanced (see
// EpochResult for how it may end early).
EpochResult field_train_epoch(const KernelSet& ks, FieldModel& model, Optimizer& opt, const Examples& examples,
                              const std::int64_t* order, index_t n_order, index_t batch_size, float alpha,
                              const NegativeSampler& sampler, std::uint64_t epoch, const StopCheck& stop,
                              int n_threads);

// One negative item for `user` (sampler's rules above), advancing rng.
std::int32_t draw_negative(const NegativeSampler& s, std::int32_t user, std::uint64_t& rng);

// The update rule of embedding rows under a dense rule: plain SGD (no momentum), row-wise Adagrad, lazy Adam.
UpdateRule embedding_rule(const UpdateRule& dense_rule);

// The buffers of one minibatch of a field model (fields.cpp).
struct FieldWorkspace;

// A tower's forward and backward passes over batches of up to `rows` rows (model.tower: see FieldModel).
class TowerPass {
 public:
  TowerPass(const FieldModel& model, index_t rows, bool training);
  ~TowerPass();
  TowerPass(const TowerPass&) = delete;
  TowerPass& operator=(const TowerPass&) = delete;
  // The tower's output for keys[0:n] (n x out_dim, valid until the next call). dropout_stream: training's
  // seed for field dropout (none when predicting).
  const float* forward(const KernelSet& ks, const std::int32_t* keys, index_t n, const std::uint64_t* dropout_stream,
                       int n_threads);
  // To fill before backward: dLoss/d(output) of the last forward's rows, times `denominator` (see backward).
  float* output_gradient();
  // Gradients of the last forward's rows, from output_gradient() and the L2 weight alpha, both divided by
  // `denominator` (the loss is a mean over that many examples): the MLP's to mlp_sink, each field's touched
  // rows to field_sink(i, touched, G, threads). Returns the L2 terms 0.5 alpha ||.||^2 / denominator (MLP
  // weights, the batch's touched embedding rows).
  using FieldSink = std::function<void(std::size_t field, const TouchedRows& touched, const float* G, int n_threads)>;
  double backward(const KernelSet& ks, float alpha, double denominator, GradientSink& mlp_sink,
                  const FieldSink& field_sink, int n_threads);

 private:
  const FieldModel& m_;
  FieldWorkspace* ws_;
  index_t n_ = 0;
};

// field_predict of one example at a time, with its workspace kept between calls: the single-row serving path
// (no allocation per call). Not thread-safe: one caller at a time (the bindings hold the GIL around it).
class RowPredictor {
 public:
  // copy_weights: the MLP's weights and biases are read from 64-byte aligned copies made here (a caller's
  // arrays, e.g. NumPy's, are 16-byte aligned: every 64-byte load of a row would span two cache lines). The
  // copies are this object's: a later change to the model's arrays is not seen (build a new RowPredictor).
  explicit RowPredictor(const FieldModel& model, bool copy_weights = false);
  ~RowPredictor();
  RowPredictor(const RowPredictor&) = delete;
  RowPredictor& operator=(const RowPredictor&) = delete;
  // The output (probability for "bce", value for "mse") of the example whose key values are keys[0:n_keys]
  // (checked as validate(model, examples) checks them; the model itself is validated by the caller).
  float predict(const KernelSet& ks, const std::int32_t* keys);

 private:
  const FieldModel& m_;
  FieldWorkspace* ws_;
  std::vector<index_t> key_rows_;  // per key column, the rows every table it reads has (-1: none reads it)
  Network mlp_copy_;              // copy_weights: m_.mlp over weights_ (else unused)
  AlignedBuffer weights_;
  const Network* mlp_;            // the MLP predict runs: &m_.mlp or &mlp_copy_
};

// ---- Differentially private training (private.cpp) ----
// One training batch of a field model, pass by pass: the examples' rows plus sampled negatives, then the
// forward pass, the loss and the backward products, leaving for the caller to read (per example: not
// divided by the row count) every layer's output gradient, the input gradient dx and the GMF vectors'
// gradients. No parameter is updated. A private step clips and noises these before any update.
class FieldBatchPass {
 public:
  FieldBatchPass(const FieldModel& model, index_t rows);
  ~FieldBatchPass();
  FieldBatchPass(const FieldBatchPass&) = delete;
  FieldBatchPass& operator=(const FieldBatchPass&) = delete;
  // Gathers examples[rows[0:n_pos]] and sampler.negatives negatives per positive drawn from `stream` (row
  // n_pos + p * negatives + j is positive p's j-th); returns the row count.
  index_t gather(const Examples& ex, const std::int64_t* rows, index_t n_pos, const NegativeSampler& sampler,
                 std::uint64_t stream);
  // Forward and backward passes over the gathered rows (field dropout from dropout_stream); returns the data
  // loss summed over the rows (not finite when the batch diverged).
  double run(const KernelSet& ks, std::uint64_t dropout_stream, int n_threads);
  index_t rows() const { return n_; }
  const float* layer_input(std::size_t l) const;  // rows x fan_in(l), ld layer_input_ld(l)
  index_t layer_input_ld(std::size_t l) const;
  const float* delta(std::size_t l) const;        // rows x fan_out(l): dLoss/d(layer l's pre-activation)
  const float* dx() const;                        // rows x width: dLoss/dx (the columns of MLP fields)
  const float* gmf_pooled(int side) const;        // rows x dim, side 0: field_u, 1: field_v
  const float* gmf_delta(int side) const;
  CsrView bags(std::size_t field) const;          // the batch's bag of each row for field i

 private:
  const FieldModel& m_;
  FieldWorkspace* ws_;
  index_t n_ = 0;
};

// Per-handle cache of top-k: the item-keyed inputs times W_0 for every item (n_items x fan_out(0)) and the
// items' pooled GMF vectors. Built on the first top-k call; valid while the parameters do not change.
// Concurrent top-k calls on one handle are safe while they rank the same n_items (as a Recommender's do):
// the first builds the cache under `mutex`, the others wait for it and then only read it.
struct TopkCache {
  LargeArray item_part;  // n_items x fan_out(0): a gigabyte for a million items and 256 units
  std::vector<float> item_gmf, item_wide;
  index_t n_items = -1;
  // The approximate top-k's copy of item_part in bf16 (field_topk's approx_fraction): n_items rows of bf16_ld
  // values (fan_out(0) rounded up to 32, zero past it), each rounded to nearest even: half the bytes to
  // stream. Built by the first approximate call after item_part, stored as floats holding two bf16 each.
  LargeArray item_part_bf16;
  index_t bf16_ld = 0, bf16_items = -1;
  std::mutex mutex;
  SharedThreadChoice threads;  // the thread choice of this model's top-k calls (parallel.h)
};

// Top-k items for each user: users[u] is a value of key column `sampler.user_key`, candidates the values of
// the item key to rank (all n_items when candidates == nullptr). Seen items (sampler.seen_*) are skipped
// when exclude_seen. Writes k item indices (-1 when fewer candidates) and scores per user, best first; ties
// keep the lower item index first.
// approx_fraction > 0: approximate top-k (docs/DESIGN.md, "Approximate top-k"). Per user, a linear surrogate
// of the MLP above its first layer is fitted by least squares on the best quarter of a fixed sample of
// kProxySample candidates scored exactly; every candidate gets the surrogate's score over the bf16 copy of
// the cached first layer plus the exact GMF and wide terms; the best max(k, ceil(approx_fraction * n)) of
// those (plus as many as the user has seen items, which the exact stage then skips) are scored exactly and
// the exact top k among them returned. The same results for any n_threads. 0: exact.
void field_topk(const KernelSet& ks, const FieldModel& model, const NegativeSampler& sampler,
                const std::int32_t* users, index_t n_users, const std::int32_t* candidates, index_t n_candidates,
                index_t k, bool exclude_seen, std::int32_t* out_items, float* out_scores, TopkCache& cache,
                int n_threads, double approx_fraction = 0.0);

// The approximate top-k's first stage for one user, as field_topk runs it (a test hook): the sampled items
// (ascending), the surrogate (coef: fan_out(0) weights then the intercept, the user's wide term included) and
// the proxy score of every candidate (n_candidates of them; all n_items when candidates == nullptr).
void field_topk_proxy(const KernelSet& ks, const FieldModel& model, const NegativeSampler& sampler,
                      std::int32_t user, const std::int32_t* candidates, index_t n_candidates, TopkCache& cache,
                      std::vector<std::int32_t>& sample, std::vector<float>& coef, float* proxy);

// field_topk over a list of candidates per user (two-stage recommend: a retrieval model's candidates,
// re-ranked): user u ranks the items cand_items[cand_indptr[u] : cand_indptr[u + 1]] (values of the item key,
// in [0, sampler.n_items); a duplicate counts once). Same scores, seen-item exclusion, ties, padding and cache
// as field_topk, the same results for any n_threads.
void field_topk_candidates(const KernelSet& ks, const FieldModel& model, const NegativeSampler& sampler,
                           const std::int32_t* users, index_t n_users, const std::int64_t* cand_indptr,
                           const std::int32_t* cand_items, index_t k, bool exclude_seen, std::int32_t* out_items,
                           float* out_scores, TopkCache& cache, int n_threads);

}  // namespace fastrec
