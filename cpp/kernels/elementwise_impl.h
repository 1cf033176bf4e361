// Element-wise math (exp, activations, the GEMM epilogue) as plain loops that each ISA's translation unit
// compiles with its own flags, so the compiler vectorises them for that ISA.
// Include ONLY from kernels_*.cpp, after <cmath>/<cstdint>/<cstring>. Everything here has internal linkage:
// the same inline function compiled with different -m flags in two files must never be merged by the linker.
#pragma once
#include <algorithm>
#include <limits>
#include <vector>

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

// v = act(add + bias) in one pass (the epilogue with scale 0 and addend_scale 1: top-k's first layer).
template <Activation A>
void add_bias_act_loop(float* v, const float* add, const float* bias, int n) {
  for (int j = 0; j < n; ++j) v[j] = apply_act(add[j] + bias[j], A);
}

// x[i] = e^x[i] for i < n (x[i] <= 0 up to rounding), returning their sum in a fixed order (defined below).
float exp_in_place_sum(float* x, index_t n);

void epilogue_impl(float* c, index_t ldc, int m, int n, index_t row0, index_t col0, const Epilogue& e) {
  for (int i = 0; i < m; ++i) {
    float* v = c + i * ldc;
    if (e.scale == 0.0f && e.addend && e.addend_scale == 1.0f && e.bias && !e.mul && !e.exp_sums) {
      const float* add = e.addend + (row0 + i) * e.ld_addend + col0;
      switch (e.act) {
        case Activation::Relu: add_bias_act_loop<Activation::Relu>(v, add, e.bias + col0, n); break;
        case Activation::Logistic: add_bias_act_loop<Activation::Logistic>(v, add, e.bias + col0, n); break;
        case Activation::Tanh: add_bias_act_loop<Activation::Tanh>(v, add, e.bias + col0, n); break;
        default: add_bias_act_loop<Activation::Identity>(v, add, e.bias + col0, n); break;
      }
      continue;
    }
    if (e.scale == 0.0f)  // C is output only (whatever it held, even inf or NaN)
      for (int j = 0; j < n; ++j) v[j] = 0.0f;
    else if (e.scale != 1.0f)
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
    if (e.exp_sums) e.exp_sums[(row0 + i) * e.ld_sums + col0 / e.sums_width] = exp_in_place_sum(v, n);
  }
}

// The TileExtra epilogue applied to a stored tile (the portable path of every micro-kernel).
void finish_tile(float* c, index_t ldc, int m, int n, const TileExtra& extra) {
  Epilogue e;
  e.scale = extra.scale;
  e.bias = extra.bias;
  e.act = extra.act;
  e.mul = extra.mul;
  e.ld_mul = extra.ld_mul;
  e.mul_act = extra.mul_act;
  e.exp_sums = extra.exp_sums;
  e.ld_sums = extra.ld_sums;
  epilogue_impl(c, ldc, m, n, 0, 0, e);
}

// Prefetches of TileExtra spread over a k loop of kc steps: the loop runs up to next_stop(k, kc), which
// issues one prefetch when its turn has come, and rest() issues what is left after the loop.
class SpreadPrefetch {
 public:
  SpreadPrefetch(const TileExtra* extra, index_t kc)
      : regions_(extra ? extra->prefetch : nullptr), n_(extra ? extra->n_prefetch : 0),
        lines_(extra ? extra->prefetch_lines : 1), left_(static_cast<index_t>(n_) * lines_),
        step_(left_ > 0 ? (kc / left_ > 1 ? kc / left_ : 1) : kc) {}
  index_t next_stop(index_t k, index_t kc) {
    if (left_ > 0) one();
    return k + step_ < kc ? k + step_ : kc;
  }
  void rest() {
    while (left_ > 0) one();
  }

 private:
  void one() {
    __builtin_prefetch(static_cast<const char*>(regions_[region_]) + 64 * line_, 0, 2);
    --left_;
    if (++line_ == lines_) line_ = 0, ++region_;
  }
  const void* const* regions_;
  int n_, lines_, region_ = 0, line_ = 0;
  index_t left_, step_;
};

// GCC vector extension: 16 floats, lowered to whatever the translation unit's flags allow (one zmm, two ymm
// or four xmm), so the same source gives each ISA its own vector code.
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

typedef std::int32_t i32x16 __attribute__((vector_size(64)));  // shuffle indices

#if defined(__AVX2__)

// Transposes the 16 x 16 block whose rows are v[0..15] (v[i][j] becomes v[j][i]) in four rounds of
// two-source shuffles: 32-bit pairs, 64-bit pairs, then quarters (4 floats, "lanes") across the four groups
// of rows.
inline void transpose16(f32x16 v[16]) {
  f32x16 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = __builtin_shuffle(v[i], v[i + 1], i32x16{0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29});
    t[i + 1] = __builtin_shuffle(v[i], v[i + 1], i32x16{2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31});
  }
  // Rows g..g+3 (g = 0, 4, 8, 12): v[g + c] then holds, in lane L, those four rows' values of column 4L + c.
  for (int g = 0; g < 16; g += 4)
    for (int h = 0; h < 2; ++h) {
      v[g + 2 * h] = __builtin_shuffle(t[g + h], t[g + h + 2],
                                       i32x16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29});
      v[g + 2 * h + 1] = __builtin_shuffle(t[g + h], t[g + h + 2],
                                           i32x16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    }
  // Now v[4g + c'] with c' = 0, 1, 2, 3 holding columns c = 0, 1, 2, 3 (lane L: column 4L + c). Transpose the
  // 4 x 4 matrix of lanes (group x lane) for each c.
  for (int c = 0; c < 4; ++c) {
    const f32x16 p = __builtin_shuffle(v[c], v[4 + c], i32x16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27});
    const f32x16 q = __builtin_shuffle(v[c], v[4 + c], i32x16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    const f32x16 r = __builtin_shuffle(v[8 + c], v[12 + c], i32x16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27});
    const f32x16 s = __builtin_shuffle(v[8 + c], v[12 + c], i32x16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    t[c] = __builtin_shuffle(p, r, i32x16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23});
    t[8 + c] = __builtin_shuffle(p, r, i32x16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
    t[4 + c] = __builtin_shuffle(q, s, i32x16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23});
    t[12 + c] = __builtin_shuffle(q, s, i32x16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}
#endif

// Panel packing with R known at compile time, so the copies unroll and vectorise for the file's ISA.
template <int R>
void pack_panel(bool k_major, const float* src, index_t ld, int count, index_t kc, float* out) {
  if (k_major) {
    if (count == R) {
      for (index_t k = 0; k < kc; ++k) {
        const float* s = src + k * ld;
        float* o = out + k * R;
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) o[r] = s[r];
      }
      return;
    }
    for (index_t k = 0; k < kc; ++k) {
      const float* s = src + k * ld;
      float* o = out + k * R;
      for (int r = 0; r < R; ++r) o[r] = r < count ? s[r] : 0.0f;
    }
    return;
  }
  index_t k0 = 0;
#if defined(__AVX2__)
  // Full panels of transposed source (dZ·Wᵀ's B) go through 16 x 16 register transposes: the element-wise
  // copy below makes one strided store per float.
  if (R % 16 == 0 && count == R)
    for (; k0 + 16 <= kc; k0 += 16)
      for (int r0 = 0; r0 < R; r0 += 16) {
        f32x16 v[16];
        for (int i = 0; i < 16; ++i) v[i] = load16(src + (r0 + i) * ld + k0);
        transpose16(v);
        for (int i = 0; i < 16; ++i) std::memcpy(out + (k0 + i) * R + r0, &v[i], sizeof v[i]);
      }
#endif
  for (int r = 0; r < count; ++r) {
    const float* s = src + r * ld;
    for (index_t k = k0; k < kc; ++k) out[k * R + r] = s[k];
  }
  for (int r = count; r < R; ++r)
    for (index_t k = 0; k < kc; ++k) out[k * R + r] = 0.0f;
}

// row_sum over 64 columns at a time: the partial sums stay in registers across all entries instead of
// going through memory once per entry; the next entries' rows are prefetched (they are scattered in a
// table that may be far larger than the caches).
void row_sum_impl(const float* weights, const std::int32_t* ids, index_t count, const float* M, index_t ld, index_t n,
                  float* out) {
  index_t j0 = 0;
  for (; j0 + 64 <= n; j0 += 64) {
    f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (index_t e = 0; e < count; ++e) {
      if (e + 4 < count) {  // the whole 256-byte block: one prefetch per cache line
        const float* ahead = M + static_cast<index_t>(ids[e + 4]) * ld + j0;
        __builtin_prefetch(ahead);
        __builtin_prefetch(ahead + 16);
        __builtin_prefetch(ahead + 32);
        __builtin_prefetch(ahead + 48);
      }
      const float w = weights[e];
      const float* row = M + static_cast<index_t>(ids[e]) * ld + j0;
      a0 += w * load16(row);
      a1 += w * load16(row + 16);
      a2 += w * load16(row + 32);
      a3 += w * load16(row + 48);
    }
    std::memcpy(out + j0, &a0, sizeof a0);
    std::memcpy(out + j0 + 16, &a1, sizeof a1);
    std::memcpy(out + j0 + 32, &a2, sizeof a2);
    std::memcpy(out + j0 + 48, &a3, sizeof a3);
  }
  for (; j0 + 16 <= n; j0 += 16) {
    f32x16 a0 = {};
    for (index_t e = 0; e < count; ++e) a0 += weights[e] * load16(M + static_cast<index_t>(ids[e]) * ld + j0);
    std::memcpy(out + j0, &a0, sizeof a0);
  }
  if (j0 < n) {
    const index_t rest = n - j0;
    for (index_t j = 0; j < rest; ++j) out[j0 + j] = 0.0f;
    for (index_t e = 0; e < count; ++e) {
      const float w = weights[e];
      const float* row = M + static_cast<index_t>(ids[e]) * ld + j0;
      for (index_t j = 0; j < rest; ++j) out[j0 + j] += w * row[j];
    }
  }
}

// out[r] = bias + sum_j x[r * ld + j] w[j] for r < rows: 16 float lanes of partial sums (lane l holds
// j = l mod 16), then the lanes added pairwise: a vectorised loop whose summation order is fixed.
void dot_rows_impl(const float* x, index_t ld, index_t rows, const float* w, index_t n, float bias, float* out) {
  for (index_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    f32x16 acc = {};
    index_t j = 0;
    for (; j + 16 <= n; j += 16) acc += load16(xr + j) * load16(w + j);
    for (int l = 0; j < n; ++j, ++l) acc[l] += xr[j] * w[j];
    // Lane l += lane l + half for half = 8, 4, 2, 1 (lane 0 ends with the sum), as whole-vector shuffles:
    // scalar lane extracts cost more than the row's FMAs.
    acc += __builtin_shuffle(acc, i32x16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    acc += __builtin_shuffle(acc, i32x16{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    acc += __builtin_shuffle(acc, i32x16{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    acc += __builtin_shuffle(acc, i32x16{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
    out[r] = bias + acc[0];
  }
}

// sum(x^2) in double: 16 float lanes of partial sums (lane l holds elements i = l mod 16, a fixed order
// whatever the caller's threads), added in double at the end. Float partials are exact enough for a loss
// term and keep the loop vectorised rather than one latency-bound double chain.
// Eight lanes: one AVX2 register (the 16-lane type is split and spilled there when selects are involved).
typedef float f32x8 __attribute__((vector_size(32)));
typedef std::int32_t i32x8 __attribute__((vector_size(32)));

// e^x on 8 lanes for x <= 0: expf_vec's reduction and polynomial, with round-to-nearest as the truncation of
// x log2(e) - 1/2 (x <= 0) so that it stays in vector registers (no floor instruction before SSE4.1).
__attribute__((always_inline)) inline f32x8 exp8_nonpositive(f32x8 x) {
  const f32x8 lo = f32x8{} - 87.0f;
  x = x > lo ? x : lo;
  const i32x8 k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x8);
  const f32x8 kf = __builtin_convertvector(k, f32x8);
  f32x8 r = x - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  f32x8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x8 bits = (k + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

void exp_shift_impl(float* x, index_t n, float* max_out, float* sum_out) {
  const float neg_inf = -__builtin_inff();
  f32x8 m = f32x8{} + neg_inf;
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f32x8 v;
    std::memcpy(&v, x + i, sizeof v);
    m = m > v ? m : v;
  }
  float mx = neg_inf;
  for (int l = 0; l < 8; ++l) mx = mx > m[l] ? mx : m[l];
  for (; i < n; ++i) mx = mx > x[i] ? mx : x[i];
  // The tail goes through a padded vector: every element gets the same arithmetic.
  const index_t full = n / 8 * 8;
  f32x8 acc = {};
  auto step = [&](float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    const f32x8 e = exp8_nonpositive(v - mx);
    const f32x8 out = v > neg_inf ? e : f32x8{};
    std::memcpy(p, &out, sizeof out);
    acc += out;
  };
  for (i = 0; i < full; i += 8) step(x + i);
  if (full < n) {
    float pad[8];
    for (int l = 0; l < 8; ++l) pad[l] = full + l < n ? x[full + l] : neg_inf;
    step(pad);
    for (index_t l = 0; full + l < n; ++l) x[full + l] = pad[l];
  }
  *max_out = mx;
  *sum_out = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float exp_in_place_sum(float* x, index_t n) {
  const float neg_inf = -__builtin_inff();
  f32x8 acc = {};
  auto step = [&](float* p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    const f32x8 out = v == v ? exp8_nonpositive(v) : v;  // NaN stays NaN: a diverged batch must show
    std::memcpy(p, &out, sizeof out);
    acc += out;
  };
  const index_t full = n / 8 * 8;
  for (index_t i = 0; i < full; i += 8) step(x + i);
  if (full < n) {  // the tail through a padded vector (-inf pads: e^-inf counted as 0)
    float pad[8];
    for (int l = 0; l < 8; ++l) pad[l] = full + l < n ? x[full + l] : neg_inf;
    f32x8 v;
    std::memcpy(&v, pad, sizeof v);
    const f32x8 out = v > neg_inf ? exp8_nonpositive(v) : v == v ? f32x8{} : v;
    acc += out;
    for (index_t l = 0; full + l < n; ++l) x[full + l] = out[l];
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

typedef std::uint64_t u64x8 __attribute__((vector_size(64)));
typedef std::int64_t i64x8 __attribute__((vector_size(64)));

// splitmix64's finaliser (common.h splitmix64 after its increment), of one value or of eight lanes.
template <class T>
inline T mix64(T z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Dropout multipliers of one row (kernels.h, DropoutRowFn), eight 64-bit lanes at a time (AVX-512DQ has the
// 64-bit multiply; elsewhere the compiler emulates it), the same integer arithmetic as the scalar tail.
void dropout_row_impl(std::uint64_t key, std::uint64_t e0, index_t n, std::uint64_t threshold, float scale,
                      float* out) {
  constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  std::int32_t scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof scale);
  const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const u64x8 limit = u64x8{} + threshold;
  index_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const u64x8 z = mix64(key + (e0 + static_cast<std::uint64_t>(c) + lane) * kGolden);
    const i64x8 keep = (z >> 40) >= limit;  // all ones where kept
    const i32x8 value = __builtin_convertvector(keep, i32x8) & scale_bits;
    std::memcpy(out + c, &value, sizeof value);
  }
  for (; c < n; ++c) {
    const std::uint64_t z = mix64(key + (e0 + static_cast<std::uint64_t>(c)) * kGolden);
    const std::int32_t value = (z >> 40) >= threshold ? scale_bits : 0;
    std::memcpy(out + c, &value, sizeof value);
  }
}

// Initial parameters (kernels.h, FillNormalFn), eight 64-bit lanes at a time with AVX-512, the same integer
// and float arithmetic as the scalar loop. The barrier keeps scale * x and loc + that two roundings where the
// file is compiled with -mfma (no FMA without it): every ISA gives the same bits.
void fill_normal_impl(std::uint64_t seed, std::uint64_t first, index_t n, float loc, float scale, float* out) {
  constexpr std::uint64_t kIndex = 0xd1b54a32d192ed03ULL, kGolden = 0x9e3779b97f4a7c15ULL, kMask = 0xFFFF;
  constexpr double kUnit = 1.7320508075688772 / 65536.0;  // four U(0,1) have variance 1/3
  index_t i = 0;
#ifdef __AVX512DQ__  // 64-bit lane multiplies (emulated by three 32-bit ones elsewhere: no faster than scalar)
  typedef double f64x8 __attribute__((vector_size(64)));
  const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (; i + 8 <= n; i += 8) {
    const u64x8 z = mix64((seed ^ ((first + static_cast<std::uint64_t>(i) + lane) * kIndex)) + kGolden);
    // the four 16-bit fields summed with their midpoints, minus 4 x 32768: |s| <= 131070, exact in int32
    const u64x8 sum = (z & kMask) + ((z >> 16) & kMask) + ((z >> 32) & kMask) + (z >> 48);
    const i32x8 s = __builtin_convertvector(sum, i32x8) - 131070;
    const f64x8 unit = __builtin_convertvector(s, f64x8) * kUnit;
    f32x8 value = __builtin_convertvector(unit, f32x8) * scale;
#ifdef __FMA__
    __asm__("" : "+x"(value));
#endif
    value = loc + value;
    std::memcpy(out + i, &value, sizeof value);
  }
#endif
  for (; i < n; ++i) {
    const std::uint64_t z = mix64((seed ^ ((first + static_cast<std::uint64_t>(i)) * kIndex)) + kGolden);
    const std::uint64_t sum = (z & kMask) + ((z >> 16) & kMask) + ((z >> 32) & kMask) + (z >> 48);
    const std::int32_t s = static_cast<std::int32_t>(sum) - 131070;
    float value = static_cast<float>(static_cast<double>(s) * kUnit) * scale;
#ifdef __FMA__
    __asm__("" : "+x"(value));
#endif
    out[i] = loc + value;
  }
}

// Standardised rows (kernels.h, StandardizeF32Fn / StandardizeF64Fn). Eight rows at a time are one flat run of 8c values read
// against mean / std repeated eight times: a plain loop the compiler vectorises whatever c is (the divisions
// dominate: a vector divides 8 values where the scalar loop divided one).
template <class T>
bool standardize_rows_impl(const T* values, index_t rows, index_t c, const double* mean, const double* std,
                           float* out) {
  constexpr index_t kRows = 8;
  std::vector<double> m(static_cast<std::size_t>(kRows * c)), s(static_cast<std::size_t>(kRows * c));
  for (index_t k = 0; k < kRows * c; ++k) {
    m[static_cast<std::size_t>(k)] = mean[k % c];
    s[static_cast<std::size_t>(k)] = std[k % c];
  }
  const double limit = std::numeric_limits<float>::max();
  const double* mp = m.data();
  const double* sp = s.data();
  int bad = 0;
  for (index_t r = 0; r < rows; r += kRows) {
    const index_t len = std::min(kRows, rows - r) * c;
    const T* v = values + r * c;
    float* o = out + r * c;
    for (index_t k = 0; k < len; ++k) {
      const double x = (static_cast<double>(v[k]) - mp[k]) / sp[k];
      bad |= !(std::fabs(x) <= limit);
      o[k] = static_cast<float>(x);
    }
  }
  return bad != 0;
}

// Lane l += lane l + half for half = 8, 4, 2, 1: lane 0 ends with the sum (dot_rows_impl's order).
inline float lane_sum(f32x16 acc) {
  acc += __builtin_shuffle(acc, i32x16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  acc += __builtin_shuffle(acc, i32x16{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  acc += __builtin_shuffle(acc, i32x16{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  acc += __builtin_shuffle(acc, i32x16{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
  return acc[0];
}

// kernels.h, LayerNormFn: whole 16-float groups as vectors, the tail element by element in the same lanes.
void layer_norm_impl(const float* x, index_t rows, index_t n, const float* gamma, const float* beta, float eps,
                     float* xhat, float* rstd, float* y) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const index_t full = n / 16 * 16;
  for (index_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* hr = xhat + r * n;
    float* yr = y + r * n;
    f32x16 acc = {};
    for (index_t c = 0; c < full; c += 16) acc += load16(xr + c);
    for (index_t c = full; c < n; ++c) acc[c - full] += xr[c];
    const float mean = lane_sum(acc) * inv_n;
    f32x16 sq = {};
    for (index_t c = 0; c < full; c += 16) {
      const f32x16 h = load16(xr + c) - mean;
      sq += h * h;
    }
    for (index_t c = full; c < n; ++c) {
      const float h = xr[c] - mean;
      sq[c - full] += h * h;
    }
    const float rs = 1.0f / __builtin_sqrtf(lane_sum(sq) * inv_n + eps);
    rstd[r] = rs;
    for (index_t c = 0; c < full; c += 16) {
      const f32x16 h = (load16(xr + c) - mean) * rs;
      const f32x16 out = h * load16(gamma + c) + load16(beta + c);
      std::memcpy(hr + c, &h, sizeof h);
      std::memcpy(yr + c, &out, sizeof out);
    }
    for (index_t c = full; c < n; ++c) {
      hr[c] = (xr[c] - mean) * rs;
      yr[c] = hr[c] * gamma[c] + beta[c];
    }
  }
}

void layer_norm_backward_impl(const float* dy, const float* gamma, const float* xhat, const float* rstd, index_t rows,
                              index_t n, float* p, float* dx) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const index_t full = n / 16 * 16;
  for (index_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * n;
    const float* hr = xhat + r * n;
    float* pr = p + r * n;
    float* dxr = dx + r * n;
    f32x16 sg = {}, sgx = {};
    for (index_t c = 0; c < full; c += 16) {
      const f32x16 d = load16(dyr + c), h = load16(hr + c), g = d * load16(gamma + c), ph = d * h;
      sg += g;
      sgx += g * h;
      std::memcpy(pr + c, &ph, sizeof ph);
    }
    for (index_t c = full; c < n; ++c) {
      const float g = dyr[c] * gamma[c];
      sg[c - full] += g;
      sgx[c - full] += g * hr[c];
      pr[c] = dyr[c] * hr[c];
    }
    const float mg = lane_sum(sg) * inv_n, mgx = lane_sum(sgx) * inv_n, rs = rstd[r];
    for (index_t c = 0; c < full; c += 16) {
      const f32x16 h = load16(hr + c), g = load16(dyr + c) * load16(gamma + c);
      const f32x16 out = load16(dxr + c) + rs * (g - mg - h * mgx);
      std::memcpy(dxr + c, &out, sizeof out);
    }
    for (index_t c = full; c < n; ++c) dxr[c] += rs * (dyr[c] * gamma[c] - mg - hr[c] * mgx);
  }
}

// kernels.h, TransposeFn: 16 x 16 blocks through registers (a scalar transpose makes one strided store per
// float); edge blocks are loaded zero-padded.
void att_transpose_impl(const float* y, index_t ld, index_t n, index_t dh, index_t w, index_t np, float* yt) {
#if defined(__AVX2__)
  for (index_t j0 = 0; j0 < np; j0 += 16)
    for (index_t k0 = 0; k0 < w; k0 += 16) {
      f32x16 v[16];
      for (int i = 0; i < 16; ++i) {
        const index_t j = j0 + i;
        if (j < n && k0 + 16 <= dh) {
          v[i] = load16(y + j * ld + k0);
        } else {
          v[i] = f32x16{};
          for (index_t k = k0; j < n && k < dh && k < k0 + 16; ++k) v[i][k - k0] = y[j * ld + k];
        }
      }
      transpose16(v);
      for (int i = 0; i < 16; ++i) std::memcpy(yt + (k0 + i) * np + j0, &v[i], sizeof v[i]);
    }
#else
  for (index_t k = 0; k < w; ++k)
    for (index_t j = 0; j < np; ++j) yt[k * np + j] = k < dh && j < n ? y[j * ld + k] : 0.0f;
#endif
}

// Causal attention's small products (kernels.h, RowsColsFn / WeightsRowsFn / WeightsTRowsFn): register tiles
// of R rows x G groups of 16 columns, one chain per output element in the documented order whatever the tile.
inline void store_scaled(float* out, f32x16 v, float scale) {
  v *= scale;
  std::memcpy(out, &v, sizeof v);
}

template <int R, int G>
inline void rows_cols_tile(const float* x, index_t ldx, const float* yt, index_t ldy, index_t w, float scale,
                           float* out, index_t ldo) {
  f32x16 acc[R][G] = {};
  for (index_t k = 0; k < w; ++k) {
    f32x16 b[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) b[g] = load16(yt + k * ldy + 16 * g);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float a = x[r * ldx + k];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += a * b[g];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) store_scaled(out + r * ldo + 16 * g, acc[r][g], scale);
}

template <int R>
void rows_cols_rows(const float* x, index_t ldx, index_t groups, const float* yt, index_t ldy, index_t w, float scale,
                    float* out, index_t ldo) {
  index_t g = 0;
  for (; g + 4 <= groups; g += 4) rows_cols_tile<R, 4>(x, ldx, yt + 16 * g, ldy, w, scale, out + 16 * g, ldo);
  switch (groups - g) {
    case 3: rows_cols_tile<R, 3>(x, ldx, yt + 16 * g, ldy, w, scale, out + 16 * g, ldo); break;
    case 2: rows_cols_tile<R, 2>(x, ldx, yt + 16 * g, ldy, w, scale, out + 16 * g, ldo); break;
    case 1: rows_cols_tile<R, 1>(x, ldx, yt + 16 * g, ldy, w, scale, out + 16 * g, ldo); break;
    default: break;
  }
}

void att_rows_cols_impl(const float* x, index_t ldx, index_t t0, index_t t1, const float* yt, index_t ldy, index_t w,
                        float scale, float* out, index_t ldo) {
  index_t t = t0;
  for (; t + 4 <= t1; t += 4)
    rows_cols_rows<4>(x + t * ldx, ldx, (t + 3) / 16 + 1, yt, ldy, w, scale, out + t * ldo, ldo);
  for (; t < t1; ++t) rows_cols_rows<1>(x + t * ldx, ldx, t / 16 + 1, yt, ldy, w, scale, out + t * ldo, ldo);
}

// Rows t0 .. t0 + R - 1 of out = p y over j <= t: j = 0 .. t0 for all rows together, then each row's own
// remaining j (row r: t0 + 1 .. t0 + r), continuing the same chains.
template <int R, int G>
inline void weights_rows_tile(const float* p, index_t ldp, index_t t0, const float* y, index_t ldy, float* out,
                              index_t ldo) {
  f32x16 acc[R][G] = {};
  for (index_t j = 0; j <= t0; ++j) {
    f32x16 b[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) b[g] = load16(y + j * ldy + 16 * g);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float a = p[r * ldp + j];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += a * b[g];
    }
  }
  // Unrolled whole (R and the counts are constants): a loop here indexed acc at run time, which kept all the
  // accumulators on the stack, the main loop's included.
#pragma GCC unroll 4
  for (int r = 1; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 1; q <= r; ++q) {
      const index_t j = t0 + q;
      const float a = p[r * ldp + j];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += a * load16(y + j * ldy + 16 * g);
    }
  // through a copy: the address of acc itself would keep the accumulators on the stack
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const f32x16 v = acc[r][g];
      std::memcpy(out + r * ldo + 16 * g, &v, sizeof v);
    }
}

template <int R>
void weights_rows_block(const float* p, index_t ldp, index_t t0, const float* y, index_t ldy, index_t w, float* out,
                        index_t ldo) {
  const index_t groups = w / 16;
  index_t g = 0;
  for (; g + 4 <= groups; g += 4) weights_rows_tile<R, 4>(p, ldp, t0, y + 16 * g, ldy, out + 16 * g, ldo);
  switch (groups - g) {
    case 3: weights_rows_tile<R, 3>(p, ldp, t0, y + 16 * g, ldy, out + 16 * g, ldo); break;
    case 2: weights_rows_tile<R, 2>(p, ldp, t0, y + 16 * g, ldy, out + 16 * g, ldo); break;
    case 1: weights_rows_tile<R, 1>(p, ldp, t0, y + 16 * g, ldy, out + 16 * g, ldo); break;
    default: break;
  }
}

void att_weights_rows_impl(const float* p, index_t ldp, index_t t0, index_t t1, const float* y, index_t ldy, index_t w,
                           float* out, index_t ldo) {
  index_t t = t0;
  for (; t + 4 <= t1; t += 4) weights_rows_block<4>(p + t * ldp, ldp, t, y, ldy, w, out + t * ldo, ldo);
  for (; t < t1; ++t) weights_rows_block<1>(p + t * ldp, ldp, t, y, ldy, w, out + t * ldo, ldo);
}

// Rows j0 .. j0 + R - 1 of out = pᵀ y over t >= j: each row's own first t (row r: j0 + r .. j0 + R - 2),
// then t = j0 + R - 1 .. n - 1 for all rows together, continuing the same chains.
template <int R, int G>
inline void weights_t_rows_tile(const float* p, index_t ldp, index_t j0, index_t n, const float* y, index_t ldy,
                                float* out, index_t ldo) {
  f32x16 acc[R][G] = {};
  // Unrolled whole, as weights_rows_tile's remaining j.
#pragma GCC unroll 4
  for (int r = 0; r + 1 < R; ++r)
#pragma GCC unroll 4
    for (int q = r; q < R - 1; ++q) {
      const index_t t = j0 + q;
      const float a = p[t * ldp + j0 + r];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += a * load16(y + t * ldy + 16 * g);
    }
  for (index_t t = j0 + R - 1; t < n; ++t) {
    f32x16 b[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) b[g] = load16(y + t * ldy + 16 * g);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float a = p[t * ldp + j0 + r];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += a * b[g];
    }
  }
  // through a copy: the address of acc itself would keep the accumulators on the stack
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const f32x16 v = acc[r][g];
      std::memcpy(out + r * ldo + 16 * g, &v, sizeof v);
    }
}

template <int R>
void weights_t_rows_block(const float* p, index_t ldp, index_t j0, index_t n, const float* y, index_t ldy, index_t w,
                          float* out, index_t ldo) {
  const index_t groups = w / 16;
  index_t g = 0;
  for (; g + 4 <= groups; g += 4) weights_t_rows_tile<R, 4>(p, ldp, j0, n, y + 16 * g, ldy, out + 16 * g, ldo);
  switch (groups - g) {
    case 3: weights_t_rows_tile<R, 3>(p, ldp, j0, n, y + 16 * g, ldy, out + 16 * g, ldo); break;
    case 2: weights_t_rows_tile<R, 2>(p, ldp, j0, n, y + 16 * g, ldy, out + 16 * g, ldo); break;
    case 1: weights_t_rows_tile<R, 1>(p, ldp, j0, n, y + 16 * g, ldy, out + 16 * g, ldo); break;
    default: break;
  }
}

void att_weights_t_rows_impl(const float* p, index_t ldp, index_t j0, index_t j1, index_t n, const float* y,
                             index_t ldy, index_t w, float* out, index_t ldo) {
  index_t j = j0;
  for (; j + 4 <= j1; j += 4) weights_t_rows_block<4>(p, ldp, j, n, y, ldy, w, out + j * ldo, ldo);
  for (; j < j1; ++j) weights_t_rows_block<1>(p, ldp, j, n, y, ldy, w, out + j * ldo, ldo);
}

double sum_squares_impl(const float* x, index_t n) {
  f32x16 acc = {};
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 v = load16(x + i);
    acc += v * v;
  }
  double total = 0.0;
  for (int l = 0; l < 16; ++l) total += acc[l];
  for (; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

void update_impl(const UpdateRule& r, float* p, const float* g, float* s1, float* s2, index_t len) {
  const float lr = r.lr, eps = r.epsilon;
  switch (r.kind) {
    case UpdateKind::Sgd: {
      const float mom = r.momentum;
      if (r.nesterov) {
        for (index_t i = 0; i < len; ++i) {
          const float v = mom * s1[i] - lr * g[i];
          s1[i] = v;
          p[i] += mom * v - lr * g[i];
        }
      } else {
        for (index_t i = 0; i < len; ++i) {
          const float v = mom * s1[i] - lr * g[i];
          s1[i] = v;
          p[i] += v;
        }
      }
      return;
    }
    case UpdateKind::Adagrad:
      for (index_t i = 0; i < len; ++i) {
        const float s = s1[i] + g[i] * g[i];
        s1[i] = s;
        p[i] -= lr * g[i] / (__builtin_sqrtf(s) + eps);
      }
      return;
    case UpdateKind::Adam: {
      const float b1 = r.beta_1, b2 = r.beta_2;
      for (index_t i = 0; i < len; ++i) {
        const float m = b1 * s1[i] + (1.0f - b1) * g[i];
        const float s = b2 * s2[i] + (1.0f - b2) * g[i] * g[i];
        s1[i] = m;
        s2[i] = s;
        p[i] -= lr * m / (__builtin_sqrtf(s) + eps);
      }
      return;
    }
    case UpdateKind::PlainSgd:
      for (index_t i = 0; i < len; ++i) p[i] -= lr * g[i];
      return;
    case UpdateKind::RowAdagrad: {
      const float a = s1[0] + static_cast<float>(sum_squares_impl(g, len) / static_cast<double>(len));
      s1[0] = a;
      const float step = lr / (__builtin_sqrtf(a) + eps);
      for (index_t i = 0; i < len; ++i) p[i] -= step * g[i];
      return;
    }
  }
}

}  // namespace
}  // namespace fastrec
