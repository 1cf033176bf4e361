// Layer 1 of the large Recommender's one-row MLP (321 x 256, two kc = 256 blocks) by a copy of the core's
// 16-chain row kernel, with a software prefetch of row k + D of B (D = 0: none). A sketch for the next step of
// benchmarks/SERVING.md, not the core's code:  g++ -O3 -std=c++17 benchmarks/row_prefetch.cpp -o /tmp/rp && /tmp/rp
#include <chrono>
#include <cstdio>
#include <vector>
#include <immintrin.h>
using clk = std::chrono::steady_clock;
static double now() { return std::chrono::duration<double>(clk::now().time_since_epoch()).count(); }
template <int D>
__attribute__((target("avx512f,fma"), noinline)) void row16(long kc, const float* a, const float* b, long rs_b, float* c) {
  __m512 r[16];
  __m512 r0 = _mm512_setzero_ps(), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0;
  __m512 r8 = r0, r9 = r0, r10 = r0, r11 = r0, r12 = r0, r13 = r0, r14 = r0, r15 = r0;
  for (long k = 0; k < kc; ++k, b += rs_b) {
    if (D > 0) { const char* p = (const char*)(b + D * rs_b);
      for (int l = 0; l < 16; ++l) _mm_prefetch(p + 64 * l, _MM_HINT_T0); }
    const __m512 ak = _mm512_set1_ps(a[k]);
    r0 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b), r0); r1 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 16), r1);
    r2 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 32), r2); r3 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 48), r3);
    r4 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 64), r4); r5 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 80), r5);
    r6 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 96), r6); r7 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 112), r7);
    r8 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 128), r8); r9 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 144), r9);
    r10 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 160), r10); r11 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 176), r11);
    r12 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 192), r12); r13 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 208), r13);
    r14 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 224), r14); r15 = _mm512_fmadd_ps(ak, _mm512_loadu_ps(b + 240), r15);
  }
  r[0]=r0;r[1]=r1;r[2]=r2;r[3]=r3;r[4]=r4;r[5]=r5;r[6]=r6;r[7]=r7;r[8]=r8;r[9]=r9;r[10]=r10;r[11]=r11;r[12]=r12;r[13]=r13;r[14]=r14;r[15]=r15;
  for (int v = 0; v < 16; ++v) _mm512_storeu_ps(c + 16 * v, r[v]);
}
template <int D> double run(const std::vector<float>& W, const std::vector<float>& a, std::vector<float>& c, long K) {
  const int reps = 20000; double s = now();
  for (int r = 0; r < reps; ++r) { asm volatile("" ::: "memory"); row16<D>(256, a.data(), W.data(), 256, c.data()); row16<D>(K - 256, a.data() + 256, W.data() + 256 * 256, 256, c.data()); }
  return (now() - s) / reps * 1e6;
}
int main() {
  const long K = 321; std::vector<float> W(K * 256 + 64 * 256, 0.01f), a(K, 0.5f), c(256);
  // evict-ish: also touch another 600KB as the other layers would
  for (int t = 0; t < 6; ++t)
    std::printf("D=0 %.3f  D=2 %.3f  D=4 %.3f  D=8 %.3f us\n", run<0>(W, a, c, K), run<2>(W, a, c, K), run<4>(W, a, c, K), run<8>(W, a, c, K));
}
