// The approximate top-k's proxy (kernels.h, ActDotsFn): one pass over bf16 rows, as plain vector-extension
// code that each ISA's translation unit compiles with its own flags (like elementwise_impl.h).
// Include ONLY from kernels_*.cpp, after elementwise_impl.h (f32x16, lane_sum, apply_act). Internal linkage.
#pragma once

namespace fastrec {
namespace {

typedef std::uint16_t u16x16 __attribute__((vector_size(32)));
typedef std::uint32_t u32x16 __attribute__((vector_size(64)));

// 16 bf16 values widened to float (a bf16 is the high half of its float).
inline f32x16 load_bf16x16(const std::uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

template <Activation A>
inline f32x16 act16(f32x16 v) {
  if (A == Activation::Relu) return v > 0.0f ? v : f32x16{} ;
  if (A == Activation::Identity) return v;
  for (int i = 0; i < 16; ++i) v[i] = apply_act(v[i], A);
  return v;
}

// Four rows at a time (four independent FMA chains); each row's sum: 16 lanes over j in steps of 16, then
// lane_sum, whatever rows it is computed with.
// The linear part's last d % 16 values in lanes 0.. (zero past them), added in the same lanes.
inline f32x16 load_tail16(const float* p, index_t count) {
  f32x16 v = {};
  std::memcpy(&v, p, sizeof(float) * static_cast<std::size_t>(count));
  return v;
}

template <Activation A, int R>
inline void act_dots_rows(const std::uint16_t* const* x, index_t h, const float* u, const float* a,
                          const float* const* y, index_t d, const float* g, float bias, float* out) {
  f32x16 acc[R] = {};
  for (index_t j = 0; j < h; j += 16) {
    const f32x16 uj = load16(u + j), aj = load16(a + j);
    for (int r = 0; r < R; ++r) acc[r] += aj * act16<A>(load_bf16x16(x[r] + j) + uj);
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
