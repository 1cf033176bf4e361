// Measured bf16 dot-product peak (VDPBF16PS) of this machine, the ceiling for bench_bf16_gemm.py's bf16
// figures, as fma_peak.cpp measures the float32 FMA peak: 24 independent VDPBF16PS chains per thread on
// registers only, on 1 and on `threads` threads at once. A 512-bit VDPBF16PS does 32 multiply-adds (2 per
// float32 lane): 64 flops. Build: c++ -O2 -pthread bf16_peak.cpp (the function has its own target attribute);
// prints one line per thread count, "avx512_bf16 <threads> <GFLOP/s>", or "none 0 0" without avx512_bf16.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr long kIters = 20000000;
constexpr int kChains = 24;

__attribute__((target("avx512f,avx512bf16"))) float chains_bf16() {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  // bf16 pairs 0x3F80 (1.0) and 0x3400 (~1.2e-7): sums grow slowly, stay finite
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3F803F80), b = (__m512bh)_mm512_set1_epi32(0x34003400);
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 24  // the chains must live in registers
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  float sum = 0.0f;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}

double measure(int threads) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<std::thread> pool;
    std::vector<float> sink(static_cast<std::size_t>(threads));
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[static_cast<std::size_t>(t)] = chains_bf16(); });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (sink[0] == 12345.0f) std::puts("");  // keeps the results live
  }
  return 64.0 * kChains * static_cast<double>(kIters) * threads / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::puts("none 0 0");
    return 0;
  }
  for (int t : {1, threads}) {
    std::printf("avx512_bf16 %d %.1f\n", t, measure(t));
    if (threads == 1) break;
  }
  return 0;
}
