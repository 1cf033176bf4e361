// Shared plain types of the fastrec core: no Python, no SIMD types.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastrec {

using index_t = std::int64_t;

// Element-wise activations. Derivatives are written in terms of the activation's output
// (scikit-learn's convention), so backward never needs the pre-activation.
enum class Activation : int { Identity = 0, Logistic = 1, Tanh = 2, Relu = 3, Softmax = 4 };

Activation parse_activation(const std::string& name);  // throws std::invalid_argument

// Throw std::invalid_argument (-> Python ValueError) unless cond holds.
inline void require(bool cond, const std::string& message) {
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

}  // namespace fastrec
