// The sequential model (docs/DESIGN.md, "Sequential model (issue 13)"): pre-norm causal self-attention
// blocks over each user's latest item rows (SASRec with the pre-norm block), the score of item i after
// position t being z_t . E[i] with the item table E shared by input and output. The mathematics is
// reference.sequential_forward / sequential_loss_and_gradients; parameters and optimizer state are
// caller-owned float32 arrays, updated in place.
//
// Layout. Every parameter array has an index in one canonical order, shared by the gradients and the two
// optimizer states: 0 item_table (n_items x d), 1 position_table (max_len x d), then per block b the 16
// arrays of reference.SEQ_BLOCK_KEYS at 2 + 16 b + k, then final_gamma, final_beta.
//
// How it computes. Padding slots (item -1) are dropped: a batch's event rows are compacted (sequence by
// sequence, in slot order) into R rows, every (R x d) projection and the feed-forward layers are single
// sgemm calls over them, and attention runs per (sequence, head) on that sequence's rows, fused in one pass
// over tiles in cache (the kernels' att_* products over the lower triangle, the masked softmax in place). A padding row's contribution in the
// reference is exactly zero (its output after the blocks is 0, so z = final_beta there), so skipping it
// changes nothing but the cost. Every reduction has a fixed order (sgemm's chains over rows for the
// weight gradients, column sums row by row, item-row gradients summed in batch order per item), so the
// results are bitwise the same for any n_threads.
//
// Python binding (bindings.cpp, _core.SequentialModel; docs/DESIGN.md's contract, plus):
//   - train_epoch's state1 / state2 (Adam's first and second moments) are dicts shaped like params without
//     "heads" ({"item_table", "position_table", "blocks": [16 arrays each], "final_gamma", "final_beta"}),
//     float32, writeable, not sharing memory with params; under solver "sgd" they are not read (None is fine).
//   - epoch_batches(indptr, items, order, batch_size, training, epoch) -> [(seqs, targets, negatives,
//     dropout_stream)], the batches train_epoch builds (seq_batch below): a test hook, so the oracle can
//     check an epoch's steps with the negatives and dropout masks the core used.
//   - training["negatives"] may be 0 (positives only); training["n_items"] (the sampling range) may be
//     smaller than the item table.
//   - the sampled softmax (DESIGN.md's loss "softmax"): loss_and_gradients(seqs, targets, None, ..., log_q=)
//     as the reference; train_epoch with training["loss"] = "softmax" (default "bce") draws no negatives and
//     corrects each batch's logits by log_q[c] = log(N item_prob[c]) when training["item_prob"] (float32
//     (n_items,) probabilities) is given, N = the batch's target positions (the expected count of c among
//     them, as the two-tower model's log-Q).
//   - the handle keeps its scratch buffers between calls (SeqScratch); a call made while another runs on the
//     same handle allocates its own.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "fields.h"
#include "kernels/kernels.h"
#include "mlp.h"

namespace fastrec {

// The per-block arrays, in reference.SEQ_BLOCK_KEYS order.
enum SeqBlockArray : int {
  kLn1Gamma, kLn1Beta, kWq, kBq, kWk, kBk, kWv, kBv, kWo, kBo, kLn2Gamma, kLn2Beta, kW1, kB1, kW2, kB2,
  kSeqBlockArrays
};

// Optional item side features (docs/DESIGN.md "Sequential model", "Item side features"): wherever the model
// reads an item's vector (input tokens, scored items), item i's vector is E[i] + sum_k w_k F[f_k] over its CSR
// row k in [indptr[i], indptr[i + 1]) of feature rows f_k in [0, n_features) with weights w_k. E rows with
// id_trained[i] == 0 (items known only by their features) get a zero gradient and are never updated. The
// feature table F (n_features x d) is not one of the canonical arrays: its gradient and optimizer state are
// passed on their own. The item vectors of a batch are computed once per batch for its distinct items only,
// so a step's cost does not depend on the number of items or feature rows.
struct SeqItemFeatures {
  index_t n_features = 0;
  float* table = nullptr;                    // F, n_features x d; null: no item features
  const std::int64_t* indptr = nullptr;      // n_items + 1
  const std::int32_t* ids = nullptr;         // indptr[n_items] feature rows
  const float* weights = nullptr;            // indptr[n_items] weights
  const std::uint8_t* id_trained = nullptr;  // n_items, or null: every id row is trained
  bool on() const { return table != nullptr; }
  bool id_frozen(std::int32_t item) const { return id_trained && !id_trained[item]; }
};

struct SeqModel {
  index_t n_items = 0, dim = 0, max_len = 0;
  SeqItemFeatures features;
  int heads = 1;
  std::vector<index_t> ffn;     // feed-forward width of each block
  std::vector<float*> arrays;   // canonical order (see above)

  int n_blocks() const { return static_cast<int>(ffn.size()); }
  std::size_t n_arrays() const { return arrays.size(); }
  static std::size_t block_index(int b, int k) { return 2 + static_cast<std::size_t>(kSeqBlockArrays * b + k); }
  float* block(int b, int k) const { return arrays[block_index(b, k)]; }
  float* item_table() const { return arrays[0]; }
  float* position_table() const { return arrays[1]; }
  float* final_gamma() const { return arrays[arrays.size() - 2]; }
  float* final_beta() const { return arrays[arrays.size() - 1]; }
  // The shape (rows, cols) of array i (cols = 0 for a vector).
  std::pair<index_t, index_t> shape(std::size_t i) const;
  index_t size(std::size_t i) const {
    const auto s = shape(i);
    return s.second ? s.first * s.second : s.first;
  }
};

// Precision of the projection and feed-forward products (forward, and both backward products of each): float32
// sgemm, or bf16_gemm (gemm.h: operands rounded to bfloat16, products summed in float32) by the AVX512-BF16
// kernel (native) or the emulated one, in training (seq_loss_and_gradients, seq_train_epoch); seq_forward
// (scoring) is float32 always. Parameters, Adam state, layer norms, attention, softmax and the loss stay
// float32. The oracle is reference.sequential_loss_and_gradients(..., precision="bf16").
enum class SeqPrecision { Float32, Bf16Emulated, Bf16Native };

// A weight gradient C (M x N, ldc) = Xᵀ dY over K rows in bf16 (X: K x M, ldx; dY: K x N, ldy): bf16_gemm(ks,
// native, trans_a = true, trans_b = false)'s bits; the native kernel through seq_bf16_weight_gradient_avx512
// (kernels.h: each K block converted once, no packed panels), the emulated one through bf16_gemm itself. With
// col_sums (N floats): also dY's column sums (the bias gradient), each a float32 chain over the rows in order.
void seq_bf16_weight_gradient(const KernelSet& ks, bool native, index_t M, index_t N, index_t K, const float* X,
                              index_t ldx, const float* dY, index_t ldy, float* C, index_t ldc, float* col_sums,
                              int n_threads);

// Canonical layout of a model with these sizes: arrays all null, to be filled by the caller.
SeqModel seq_layout(index_t n_items, index_t dim, index_t max_len, int heads, const std::vector<index_t>& ffn);

// Checks sizes (heads divides dim, at least one item and position) and the item features' CSR (rows, ids in
// range, finite weights); throws std::invalid_argument.
void validate(const SeqModel& model);

// The buffers of a batch (sequential.cpp).
struct SeqWorkspace;
// Buffers kept across calls on one model, one call at a time: an epoch's tens of megabytes of scratch are
// then allocated (and page-faulted) once, not at every call. Calls without one allocate their own.
class SeqScratch {
 public:
  explicit SeqScratch(const SeqModel& model);
  ~SeqScratch();
  SeqScratch(const SeqScratch&) = delete;
  SeqScratch& operator=(const SeqScratch&) = delete;
  SeqWorkspace& get() { return *ws_; }

 private:
  std::unique_ptr<SeqWorkspace> ws_;
};

// z for item-row sequences seqs (B x max_len, -1 = padding; rows checked by the caller): out is
// (B x max_len x d), or (B x d) holding the last slot only when last_only.
void seq_forward(const KernelSet& ks, const SeqModel& model, const std::int32_t* seqs, index_t B, bool last_only,
                 float* out, int n_threads, SeqScratch* scratch = nullptr);

// The batch's loss (mean over the positions with a target) and the gradient of every array into grads
// (canonical order, dense: the item table's is zero outside the touched rows), and, with item features, the
// feature table's into feature_grad (n_features x d, dense). targets (B x L), -1 = none.
// BCE with negatives (B x L x K), read at positions with a target only; or, negatives == nullptr, the sampled
// softmax over the batch's distinct targets with logits z . E[c] - log_q[c] (log_q: n_items floats, or none).
// Dropout: rate `dropout` with the counter-based masks of stream `stream` (reference.dropout_scale).
double seq_loss_and_gradients(const KernelSet& ks, const SeqModel& model, const std::int32_t* seqs,
                              const std::int32_t* targets, const std::int32_t* negatives, index_t B, index_t K,
                              double dropout, std::uint64_t stream, const std::vector<float*>& grads, int n_threads,
                              const float* log_q = nullptr, float* feature_grad = nullptr,
                              SeqPrecision precision = SeqPrecision::Float32);

// Users' histories: CSR rows of item rows in time order.
struct SeqHistories {
  const std::int64_t* indptr = nullptr;
  const std::int32_t* items = nullptr;
  index_t users = 0;
};

// Training's sampling: `negatives` per target position, uniform over [0, sampler.n_items), never an item of
// the user's sorted seen row (sampler.seen_*; draw_negative's rules: 64 draws at most); sampler.seed keys
// the streams.
// softmax: the sampled softmax over each batch's distinct targets instead (no negatives drawn), corrected by
// log_q[c] = log(N item_prob[c]) (the expected count of c among the batch's N targets) when item_prob is given.
struct SeqTraining {
  int negatives = 1;
  NegativeSampler sampler;
  bool softmax = false;
  const float* item_prob = nullptr;  // n_items, or none
};

// Batch `batch_index` of epoch `epoch` over users[0:n], as train_epoch builds it: per user its latest
// max_len + 1 events h, inputs h[:-1] right-aligned in seqs (n x L, -1 padding), targets h[1:] in the same
// slots (-1 elsewhere), negatives (n x L x K, -1 where no target) drawn in (user, slot, j) order from the
// batch's stream. Returns the number of target positions; *dropout_stream gets the batch's dropout stream.
index_t seq_batch(const SeqModel& model, const SeqHistories& h, const SeqTraining& t, const std::int64_t* users,
                  index_t n, std::uint64_t epoch, std::uint64_t batch_index, std::int32_t* seqs,
                  std::int32_t* targets, std::int32_t* negatives, std::uint64_t* dropout_stream);

// One epoch over the users order[i : i + batch_size] (batches as seq_batch). opt: Solver::Adam (Adam on the
// dense arrays, lazy Adam on the item rows a batch touches: its inputs, targets and negatives; one step
// counter, opt.adam_t) or Solver::Sgd (plain SGD: p -= lr g, no state, momentum ignored); opt.state1/2 hold
// one array per canonical index (Adam only). With item features, the feature rows a batch touches get lazy
// Adam too, with feature_state1/2 (n_features x d each, Adam only).
// A batch without any target position is skipped (no step).
// EpochResult: loss_sum = sum of batch loss x batch positions, rows = positions.
EpochResult seq_train_epoch(const KernelSet& ks, SeqModel& model, const SeqTraining& training, Optimizer& opt,
                            const SeqHistories& h, const std::int64_t* order, index_t n_order, index_t batch_size,
                            double dropout, std::uint64_t epoch, const StopCheck& stop, int n_threads,
                            SeqScratch* scratch = nullptr, float* feature_state1 = nullptr,
                            float* feature_state2 = nullptr, SeqPrecision precision = SeqPrecision::Float32);

}  // namespace fastrec
