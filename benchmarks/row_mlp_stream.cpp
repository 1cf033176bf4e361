// The one-row MLP of bench_serving.py's large Recommender (321-256-128-64-1, ReLU) by the core's sgemm_row,
// layer by layer and whole, against a plain AVX-512 stream over the same weights (the L2 read floor of any
// float32 one-row MLP that reads all its weights) with and without software prefetch. Inputs have no zeros,
// so the zero-skipping path stays off. Build against the static core of an installed build tree:
//   g++ -O3 -std=c++17 -flto=auto -fopenmp -Icpp benchmarks/row_mlp_stream.cpp \
//       build/cp311-cp311-linux_x86_64/libfastrec_core.a -o /tmp/row_mlp_stream && /tmp/row_mlp_stream
// (benchmarks/SERVING.md has its figures.)
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <immintrin.h>
#include "gemm.h"
#include "isa.h"
using namespace fastrec;
using clk = std::chrono::steady_clock;
double now() { return std::chrono::duration<double>(clk::now().time_since_epoch()).count(); }
__attribute__((target("avx512f"))) float stream(const float* w, long n) {
  asm volatile("" : "+r"(w));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long i = 0; i < n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(w + i)); a1 = _mm512_add_ps(a1, _mm512_loadu_ps(w + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(w + i + 32)); a3 = _mm512_add_ps(a3, _mm512_loadu_ps(w + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
__attribute__((target("avx512f"))) float stream_pf(const float* w, long n, int dist) {
  asm volatile("" : "+r"(w));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long i = 0; i < n; i += 64) {
    _mm_prefetch((const char*)(w + i + dist), _MM_HINT_T0); _mm_prefetch((const char*)(w + i + dist + 16), _MM_HINT_T0);
    _mm_prefetch((const char*)(w + i + dist + 32), _MM_HINT_T0); _mm_prefetch((const char*)(w + i + dist + 48), _MM_HINT_T0);
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(w + i)); a1 = _mm512_add_ps(a1, _mm512_loadu_ps(w + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(w + i + 32)); a3 = _mm512_add_ps(a3, _mm512_loadu_ps(w + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
int main() {
  const KernelSet& ks = kernels_for(resolve_isa("auto"));
  int dims[5] = {321, 256, 128, 64, 1};
  std::vector<std::vector<float>> W(4), b(4), act(5);
  for (int l = 0; l < 4; ++l) { W[l].resize(dims[l] * dims[l + 1]); b[l].assign(dims[l + 1], 0.01f);
    for (size_t i = 0; i < W[l].size(); ++i) W[l][i] = 0.001f * (i % 97) - 0.04f; }
  for (int l = 0; l < 5; ++l) act[l].assign(dims[l], 0.5f);
  const int reps = 20000;
  for (int trial = 0; trial < 3; ++trial) {
    double t[5] = {0};
    for (int r = 0; r < reps; ++r) {
      for (int l = 0; l < 4; ++l) {
        Epilogue e; e.bias = b[l].data(); e.act = l < 3 ? Activation::Relu : Activation::Identity;
        double s = now();
        sgemm_row(ks, dims[l + 1], dims[l], act[l].data(), W[l].data(), dims[l + 1], act[l + 1].data(), &e);
        t[l] += now() - s;
      }
    }
    double s = now(); float sink = 0;
    for (int r = 0; r < reps; ++r) for (int l = 0; l < 4; ++l) { asm volatile("" ::: "memory"); sink += stream(W[l].data(), (long)W[l].size() / 64 * 64); }
    t[4] = now() - s;
    std::printf("layers us: %.3f %.3f %.3f %.3f  | stream all weights %.3f us (%g)\n", t[0] / reps * 1e6, t[1] / reps * 1e6,
                t[2] / reps * 1e6, t[3] / reps * 1e6, t[4] / reps * 1e6, sink);
  }
  for (int dist : {256, 512, 1024, 2048}) {
    double s = now(); float sink = 0;
    for (int r = 0; r < reps; ++r) for (int l = 0; l < 4; ++l) { asm volatile("" ::: "memory"); sink += stream_pf(W[l].data(), (long)W[l].size() / 64 * 64, dist); }
    std::printf("stream prefetch %d floats ahead: %.3f us (%g)\n", dist, (now() - s) / reps * 1e6, sink);
  }
  {
    std::vector<float> small(8192, 1.0f); double s = now(); float sink = 0;
    for (int r = 0; r < reps * 60; ++r) { asm volatile("" ::: "memory"); sink += stream(small.data(), 8192); }
    std::printf("L1 stream 32KB: %.3f ns per 64B (%g)\n", (now() - s) / (reps * 60.0) / 128 * 1e9, sink);
  }
  double s = now();
  for (int r = 0; r < reps; ++r) for (int l = 0; l < 4; ++l) {
    Epilogue e; e.bias = b[l].data(); e.act = l < 3 ? Activation::Relu : Activation::Identity;
    sgemm_row(ks, dims[l + 1], dims[l], act[l].data(), W[l].data(), dims[l + 1], act[l + 1].data(), &e);
  }
  std::printf("whole MLP %.3f us\n", (now() - s) / reps * 1e6);
}
