// Element-wise math (exp, activations, the GEMM epilogue) as plain loops that each ISA's translation unit
// compiles with its own flags, so the compiler vectorises them for that ISA.
// Include ONLY from kernels_*.cpp, after <cmath>/<cstdint>/<cstring>. Everything here has internal linkage:
// the same inline function compiled with different -m flags in two files must never be merged by the linker.
#pragma once

namespace fastrec {
namespace {

// exp(x) for float, branch-free so loops over it vectorise: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial
// for e^r (Cephes' expf coefficients, < 2 ulp on [-87, 88]), scaled by 2^n built in the exponent bits.
inline float expf_vec(float x) {
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float apply_act(float v, Activation act) {
  switch (act) {
    case Activation::Relu: return v > 0.0f ? v : 0.0f;
    case Activation::Logistic: return 1.0f / (1.0f + expf_vec(-v));
    case Activation::Tanh: return 2.0f / (1.0f + expf_vec(-2.0f * v)) - 1.0f;
    default: return v;
  }
}

// Derivative of act in terms of its output a.
inline float act_derivative(float a, Activation act) {
  switch (act) {
    case Activation::Relu: return a > 0.0f ? 1.0f : 0.0f;
    case Activation::Logistic: return a * (1.0f - a);
    case Activation::Tanh: return 1.0f - a * a;
    default: return 1.0f;
  }
}

// One loop per activation so each vectorises without a switch inside.
template <Activation A>
void activate_loop(float* x, index_t n) {
  for (index_t i = 0; i < n; ++i) x[i] = apply_act(x[i], A);
}

void activate_impl(float* x, index_t n, Activation act) {
  switch (act) {
    case Activation::Relu: activate_loop<Activation::Relu>(x, n); break;
    case Activation::Logistic: activate_loop<Activation::Logistic>(x, n); break;
    case Activation::Tanh: activate_loop<Activation::Tanh>(x, n); break;
    default: break;
  }
}

template <Activation A>
void mul_derivative_loop(float* v, const float* a, int n) {
  for (int j = 0; j < n; ++j) v[j] *= act_derivative(a[j], A);
}

void epilogue_impl(float* c, index_t ldc, int m, int n, index_t row0, index_t col0, const Epilogue& e) {
  for (int i = 0; i < m; ++i) {
    float* v = c + i * ldc;
    if (e.scale != 1.0f)
      for (int j = 0; j < n; ++j) v[j] *= e.scale;
    if (e.addend) {
      const float* add = e.addend + (row0 + i) * e.ld_addend + col0;
      for (int j = 0; j < n; ++j) v[j] += e.addend_scale * add[j];
    }
    if (e.bias) {
      const float* bias = e.bias + col0;
      for (int j = 0; j < n; ++j) v[j] += bias[j];
    }
    activate_impl(v, n, e.act);
    if (e.mul) {
      const float* a = e.mul + (row0 + i) * e.ld_mul + col0;
      switch (e.mul_act) {
        case Activation::Relu: mul_derivative_loop<Activation::Relu>(v, a, n); break;
        case Activation::Logistic: mul_derivative_loop<Activation::Logistic>(v, a, n); break;
        case Activation::Tanh: mul_derivative_loop<Activation::Tanh>(v, a, n); break;
        default: break;
      }
    }
  }
}

void row_sum_impl(const float* weights, const std::int32_t* ids, index_t count, const float* M, index_t ld, index_t n,
                  float* out) {
  for (index_t j = 0; j < n; ++j) out[j] = 0.0f;
  for (index_t e = 0; e < count; ++e) {
    const float w = weights[e];
    const float* row = M + static_cast<index_t>(ids[e]) * ld;
    for (index_t j = 0; j < n; ++j) out[j] += w * row[j];
  }
}

}  // namespace
}  // namespace fastrec
