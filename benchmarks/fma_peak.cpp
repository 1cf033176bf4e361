// Measured FP32 FMA peak of this machine, the ceiling for the "fraction of peak" figures of the benchmarks:
// 24 independent FMA chains per thread on registers only (no memory traffic), for the widest vector ISA the
// CPU has, on 1 and on `threads` threads at once (cores running wide FMAs together may clock lower).
// bench_bar.py compiles and runs it (c++ -O2 -pthread fma_peak.cpp); it prints one line per thread count:
//   <isa> <threads> <GFLOP/s for all threads together>
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

__attribute__((target("avx512f"))) float chains_avx512() {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-4f);
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 24  // the chains must live in registers
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  float sum = 0.0f;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}

__attribute__((target("avx2,fma"))) float chains_avx2() {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-4f);
  for (long it = 0; it < kIters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  alignas(32) float lanes[8];
  float sum = 0.0f;
  for (int i = 0; i < kChains; ++i) {
    _mm256_store_ps(lanes, acc[i]);
    sum += lanes[0];
  }
  return sum;
}

// GFLOP/s of `threads` threads each running the chains, best of 3.
double measure(float (*chains)(), int lanes, int threads) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<std::thread> pool;
    std::vector<float> sink(static_cast<std::size_t>(threads));
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink[static_cast<std::size_t>(t)] = chains(); });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (sink[0] == 12345.0f) std::puts("");  // keeps the results live
  }
  return 2.0 * lanes * kChains * static_cast<double>(kIters) * threads / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !__builtin_cpu_supports("fma")) {
    std::puts("none 0 0");
    return 0;
  }
  for (int t : {1, threads}) {
    const double gflops = avx512 ? measure(chains_avx512, 16, t) : measure(chains_avx2, 8, t);
    std::printf("%s %d %.1f\n", avx512 ? "avx512" : "avx2", t, gflops);
    if (threads == 1) break;
  }
  return 0;
}
