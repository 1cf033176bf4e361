// Differentially private training of the field model (DP-SGD; docs/DESIGN.md, "Differential privacy
// (issue 16)"). A step: a Poisson sample of the examples (each one independently with probability q), each
// example's gradient norm computed without forming its gradient (ghost norms), the example's output
// gradients scaled by c = min(1, C / norm) so that every gradient computed from them is the clipped one, the
// clipped sum plus Gaussian noise of standard deviation sigma * C, divided by the expected batch, then the
// usual optimizer step. Embedding tables get the noise on every row ("dense") or on the rows a noisy,
// thresholded contribution count selects ("sparse", DP-AdaFEST). All noise is a counter-based stream keyed
// by (seed, step, parameter, index): the same for any n_threads.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "fields.h"
#include "mlp.h"

namespace fastrec {

struct PrivacySettings {
  double noise_multiplier = 1.0;   // sigma: gradient noise std sigma * max_grad_norm per coordinate
  double max_grad_norm = 1.0;      // C: bound on one example's gradient norm (its negatives included)
  double sampling_rate = 0.01;     // q: probability that a step includes an example
  bool sparse = true;              // embedding mechanism: thresholded contribution map, else noise on every row
  double count_noise = 1.0;        // sigma1: std of the noise on each row's contribution count ("sparse")
  double threshold = 1.0;          // tau: a row is updated when its noisy count exceeds tau ("sparse")
  // Per field, the field whose row selection it shares (empty: each its own). Fields of one group read the
  // same bag table (a GMF or wide field and its id field): one count mechanism selects rows for all of them.
  std::vector<int> count_group;
  std::uint64_t seed = 0;
  // The privacy unit "user" (unit_indptr set): unit u owns examples unit_rows[unit_indptr[u] :
  // unit_indptr[u + 1]]; a step samples the n_units units at rate q and takes at most unit_cap examples of
  // each (a random choice keyed by (seed, step, u) when it has more); each unit's summed gradient (its
  // examples' negatives included) is clipped to max_grad_norm by its exact norm. Unset: the unit is one
  // example (with its negatives), sampled at rate q.
  const std::int64_t* unit_indptr = nullptr;
  const std::int64_t* unit_rows = nullptr;
  index_t n_units = 0;
  index_t unit_cap = 0;
};

// Parameter numbers of the noise streams: MLP array k (W_0..W_{L-1}, b_0..b_{L-1}) is k.
constexpr std::uint64_t kStreamGmf = 1ULL << 20;
constexpr std::uint64_t kStreamFieldGrad = 2ULL << 20;    // + field index
constexpr std::uint64_t kStreamFieldCount = 3ULL << 20;   // + field index
constexpr std::uint64_t kStreamFalsePositive = 4ULL << 20;  // + field index
constexpr std::uint64_t kStreamSample = 5ULL << 20;
constexpr std::uint64_t kStreamNegatives = 6ULL << 20;
constexpr std::uint64_t kStreamDropout = 7ULL << 20;
constexpr std::uint64_t kStreamUnitPick = 8ULL << 20;  // + unit: which examples of a unit with too many

// Throws std::invalid_argument unless ps.count_group is valid for the model (one group per bag table).
void check_count_groups(const FieldModel& model, const PrivacySettings& ps);

// A 64-bit key of (seed, step, stream, index), and the standard normal / uniform numbers derived from it.
std::uint64_t noise_key(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t index);
// Indices 2k and 2k + 1 share one pair of the polar method (normal_pair writes both).
double normal_at(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t index);
void normal_pair(std::uint64_t seed, std::uint64_t step, std::uint64_t stream, std::uint64_t pair, double* out);

// The examples of step `step`'s sample of units (ps.unit_indptr set): each unit's (at most unit_cap) example
// indices, unit after unit; unit_start[k] is where the k-th sampled unit's begin (size: sampled units + 1).
std::vector<std::int64_t> unit_sample(const PrivacySettings& ps, std::uint64_t step, std::vector<index_t>& unit_start);

// The sorted example indices of step `step`'s Poisson sample of n examples at rate q (geometric gaps: the
// cost is the sample's size, not n).
std::vector<std::int64_t> poisson_sample(std::uint64_t seed, std::uint64_t step, index_t n, double q);

// A Binomial(trials, p) draw by inversion, in pieces of mean <= 32 (no underflow of (1-p)^trials).
std::int64_t binomial_draw(std::int64_t trials, double p, std::uint64_t& rng);

// Each positive's clipped gradient norm parts: out[p] = ||g_p|| before clipping, where g_p is the gradient of
// positive p's data loss plus its negatives' (the sum of their norms: each row is clipped to C / (1 +
// negatives), so the unit's sum stays within C). Test hook: the batch is examples[rows[0:n_pos]].
void field_example_norms(const KernelSet& ks, const FieldModel& model, const Examples& examples,
                         const std::int64_t* rows, index_t n_pos, const NegativeSampler& sampler, std::uint64_t step,
                         const PrivacySettings& p, float* out_row_norms, int n_threads);

// n_steps private steps, numbered first_step.. (the step number keys the sample and every noise stream).
// denominator: what the noised sum is divided by (the expected number of rows per step, negatives
// included). Returns the data loss of the sampled rows as EpochResult; stops early like field_train_epoch.
EpochResult field_private_steps(const KernelSet& ks, FieldModel& model, Optimizer& opt, const Examples& examples,
                                const PrivacySettings& p, float alpha, double denominator,
                                const NegativeSampler& sampler, std::int64_t first_step, std::int64_t n_steps,
                                const StopCheck& stop, int n_threads);

}  // namespace fastrec
