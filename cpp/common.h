// Shared plain types of the fastrec core: no Python, no SIMD types.
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace fastrec {

using index_t = std::int64_t;

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// Element-wise activations. Derivatives are written in terms of the activation's output
// (scikit-learn's convention), so backward never needs the pre-activation.
enum class Activation : int { Identity = 0, Logistic = 1, Tanh = 2, Relu = 3, Softmax = 4 };

Activation parse_activation(const std::string& name);  // throws std::invalid_argument

// The random streams of training (negatives, dropout): splitmix64 steps, seeded per (seed, epoch, batch) so
// that a draw never depends on the thread that makes it.
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// Uniform in [0, 1) from the top 53 bits of the next step.
inline double uniform01(std::uint64_t& state) { return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53; }

// Throw std::invalid_argument (-> Python ValueError) unless cond holds.
inline void require(bool cond, const std::string& message) {
  if (!cond) throw std::invalid_argument(message);
}
// A literal message is turned into a string only on failure (checks that run per row or per entry).
inline void require(bool cond, const char* message) {
  if (!cond) throw std::invalid_argument(message);
}

// A CSR matrix view: rows of (indices, data) between indptr[i] and indptr[i+1].
struct CsrView {
  const std::int64_t* indptr = nullptr;
  const std::int32_t* indices = nullptr;
  const float* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
};

// Asked before every training batch with the number of `order` entries done so far; returning true ends the
// epoch there (at a batch boundary: every batch before it fully applied, none partly). The binding uses it
// for Ctrl-C and progress reports.
using StopCheck = std::function<bool(index_t done)>;

// What a training epoch did. It also ends early, before applying the batch, when a batch's data loss is not
// finite: the parameters keep the state after the last batch whose loss was finite (which is finite too
// unless that step itself overflowed float32).
struct EpochResult {
  double loss_sum = 0.0;  // sum of batch_loss * batch_rows over the batches applied
  index_t rows = 0;       // rows trained on (negatives included)
  bool diverged = false;  // stopped at a batch with a NaN or infinite loss
};

}  // namespace fastrec
