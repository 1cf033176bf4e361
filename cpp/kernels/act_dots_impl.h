// The approximate top-k's proxy (kernels.h, ActDotsFn): one pass over bf16 rows, as plain vector-extension
// code that each ISA's translation unit compiles with its own flags (like elementwise_impl.h).
// Include ONLY from kernels_*.cpp, after elementwise_impl.h (f32x16, lane_sum, apply_act). Internal linkage.
#pragma once

namespace fastrec {
namespace {

typedef std::uint32_t u32x16 __attribute__((vector_size(64)));

// 32 bf16 values as two float vectors: the 16 even elements and the 16 odd ones (a little-endian 32-bit word
// holds elements 2i (low half) and 2i + 1 (high half); a bf16 is the high half of its float). Two integer ops
// for 32 values instead of widening 16 at a time.
inline void load_bf16x32(const std::uint16_t* p, f32x16& even, f32x16& odd) {
  u32x16 w;
  std::memcpy(&w, p, sizeof w);
  const u32x16 lo = w << 16, hi = w & 0xFFFF0000u;
  std::memcpy(&even, &lo, sizeof even);
  std::memcpy(&odd, &hi, sizeof odd);
}

template <Activation A>
inline f32x16 act16(f32x16 v) {
  if (A == Activation::Relu) return v > 0.0f ? v : f32x16{};
  if (A == Activation::Identity) return v;
  for (int i = 0; i < 16; ++i) v[i] = apply_act(v[i], A);
  return v;
}

// The linear part's last d % 16 values in lanes 0.. (zero past them), added in the same lanes.
inline f32x16 load_tail16(const float* p, index_t count) {
  f32x16 v = {};
  std::memcpy(&v, p, sizeof(float) * static_cast<std::size_t>(count));
  return v;
}

// Four rows at a time (four independent FMA chains); each row's sum: 16 lanes over j in steps of 32 (the even
// elements, then the odd ones), then over the linear part in steps of 16, then lane_sum, whatever rows it is
// computed with.
// u and a in the even / odd order of load_bf16x32: per 32 elements, the 16 even ones then the 16 odd ones.
template <Activation A, int R>
inline void act_dots_rows(const std::uint16_t* const* x, index_t h, const float* u, const float* a,
                          const float* const* y, index_t d, const float* g, float bias, float* out) {
  f32x16 acc[R] = {};
  for (index_t j = 0; j < h; j += 32) {
    const f32x16 u0 = load16(u + j), u1 = load16(u + j + 16), a0 = load16(a + j), a1 = load16(a + j + 16);
    for (int r = 0; r < R; ++r) {
      f32x16 even, odd;
      load_bf16x32(x[r] + j, even, odd);
      acc[r] += a0 * act16<A>(even + u0);
      acc[r] += a1 * act16<A>(odd + u1);
    }
  }
  index_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const f32x16 gj = load16(g + j);
    for (int r = 0; r < R; ++r) acc[r] += gj * load16(y[r] + j);
  }
  if (j < d) {
    const f32x16 gj = load_tail16(g + j, d - j);
    for (int r = 0; r < R; ++r) acc[r] += gj * load_tail16(y[r] + j, d - j);
  }
  for (int r = 0; r < R; ++r) out[r] = bias + lane_sum(acc[r]);
}

template <Activation A>
void act_dots_loop(const std::uint16_t* x, index_t ld, const std::int32_t* items, index_t n, index_t h,
                   const float* u, const float* a, const float* y, index_t ld_y, index_t d, const float* g,
                   float bias, float* out) {
  constexpr int R = 4;
  if (!y) d = 0;
  index_t r = 0;
  for (; r + R <= n; r += R) {
    const std::uint16_t* rows[R];
    const float* lin[R];
    for (int i = 0; i < R; ++i) {
      rows[i] = x + static_cast<index_t>(items[r + i]) * ld;
      lin[i] = d ? y + static_cast<index_t>(items[r + i]) * ld_y : nullptr;
    }
    act_dots_rows<A, R>(rows, h, u, a, lin, d, g, bias, out + r);
  }
  for (; r < n; ++r) {
    const std::uint16_t* row = x + static_cast<index_t>(items[r]) * ld;
    const float* lin = d ? y + static_cast<index_t>(items[r]) * ld_y : nullptr;
    act_dots_rows<A, 1>(&row, h, u, a, &lin, d, g, bias, out + r);
  }
}

void act_dots_impl(const std::uint16_t* x, index_t ld, const std::int32_t* items, index_t n, index_t h,
                   const float* u, const float* a, const float* y, index_t ld_y, index_t d, const float* g,
                   float bias, Activation act, float* out) {
  switch (act) {
    case Activation::Relu:
      act_dots_loop<Activation::Relu>(x, ld, items, n, h, u, a, y, ld_y, d, g, bias, out);
      break;
    case Activation::Logistic:
      act_dots_loop<Activation::Logistic>(x, ld, items, n, h, u, a, y, ld_y, d, g, bias, out);
      break;
    case Activation::Tanh:
      act_dots_loop<Activation::Tanh>(x, ld, items, n, h, u, a, y, ld_y, d, g, bias, out);
      break;
    default:
      act_dots_loop<Activation::Identity>(x, ld, items, n, h, u, a, y, ld_y, d, g, bias, out);
      break;
  }
}

}  // namespace
}  // namespace fastrec
