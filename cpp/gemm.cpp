// Blocking loops, packing and thread partition of sgemm; the arithmetic is in the per-ISA micro-kernels.
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "parallel.h"

namespace fastrec {

namespace {

// Grow-only 64-byte aligned scratch, one per thread per role (OpenMP keeps its threads, so it is reused).
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  float* get(std::size_t n) {
    if (n > capacity_) {
      std::free(data_);
      const std::size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      capacity_ = n;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  std::size_t capacity_ = 0;
};

index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// Packs op(A)[i0:i0+mc, p0:p0+kc] into MR-row panels a[panel][k][MR], zero-padding the last panel.
void pack_a(bool trans, const float* A, index_t lda, index_t i0, index_t mc, index_t p0, index_t kc, int mr,
            float* out) {
  for (index_t ir = 0; ir < mc; ir += mr) {
    const int m = static_cast<int>(std::min<index_t>(mr, mc - ir));
    float* dst = out + ir * kc;
    if (trans) {  // op(A)[i][k] = A[k][i]: MR contiguous floats per k
      for (index_t k = 0; k < kc; ++k) {
        const float* src = A + (p0 + k) * lda + i0 + ir;
        for (int i = 0; i < m; ++i) dst[k * mr + i] = src[i];
        for (int i = m; i < mr; ++i) dst[k * mr + i] = 0.0f;
      }
    } else {
      for (int i = 0; i < m; ++i) {
        const float* src = A + (i0 + ir + i) * lda + p0;
        for (index_t k = 0; k < kc; ++k) dst[k * mr + i] = src[k];
      }
      for (int i = m; i < mr; ++i)
        for (index_t k = 0; k < kc; ++k) dst[k * mr + i] = 0.0f;
    }
  }
}

// Packs op(B)[p0:p0+kc, j0:j0+nc] into NR-column panels b[panel][k][NR], zero-padding the last panel.
void pack_b(bool trans, const float* B, index_t ldb, index_t p0, index_t kc, index_t j0, index_t nc, int nr,
            float* out) {
  for (index_t jr = 0; jr < nc; jr += nr) {
    const int n = static_cast<int>(std::min<index_t>(nr, nc - jr));
    float* dst = out + jr * kc;
    if (trans) {  // op(B)[k][j] = B[j][k]
      for (int j = 0; j < n; ++j) {
        const float* src = B + (j0 + jr + j) * ldb + p0;
        for (index_t k = 0; k < kc; ++k) dst[k * nr + j] = src[k];
      }
      for (int j = n; j < nr; ++j)
        for (index_t k = 0; k < kc; ++k) dst[k * nr + j] = 0.0f;
    } else {
      for (index_t k = 0; k < kc; ++k) {
        const float* src = B + (p0 + k) * ldb + j0 + jr;
        for (int j = 0; j < n; ++j) dst[k * nr + j] = src[j];
        for (int j = n; j < nr; ++j) dst[k * nr + j] = 0.0f;
      }
    }
  }
}

struct Problem {
  const KernelSet& ks;
  bool trans_a, trans_b;
  index_t K;
  const float* A;
  index_t lda;
  const float* B;
  index_t ldb;
  float* C;
  index_t ldc;
  const Epilogue* epilogue;
};

// The five BLIS loops over one rectangle C[m0:m1, n0:n1] on the calling thread.
void gemm_block(const Problem& p, index_t m0, index_t m1, index_t n0, index_t n1) {
  thread_local Scratch a_scratch, b_scratch;
  const KernelSet& ks = p.ks;
  const index_t kc_max = std::min(ks.kc, p.K);
  float* bbuf = b_scratch.get(static_cast<std::size_t>(kc_max * ceil_div(std::min(ks.nc, n1 - n0), ks.nr) * ks.nr));
  float* abuf = a_scratch.get(static_cast<std::size_t>(kc_max * ceil_div(std::min(ks.mc, m1 - m0), ks.mr) * ks.mr));
  for (index_t jc = n0; jc < n1; jc += ks.nc) {
    const index_t nc = std::min(ks.nc, n1 - jc);
    for (index_t pc = 0; pc < p.K; pc += ks.kc) {
      const index_t kc = std::min(ks.kc, p.K - pc);
      const bool first = pc == 0, last = pc + kc == p.K;
      // Likewise B row-major is read in place but for a partial last panel; B transposed is packed.
      const bool b_in_place = !p.trans_b;
      const index_t b_full = b_in_place ? nc / ks.nr * ks.nr : 0;
      if (b_full < nc) pack_b(p.trans_b, p.B, p.ldb, pc, kc, jc + b_full, nc - b_full, ks.nr, bbuf);
      for (index_t ic = m0; ic < m1; ic += ks.mc) {
        const index_t mc = std::min(ks.mc, m1 - ic);
        // A is read in place with strides (packing row-major A would be a transpose copy costing as much as
        // the FMAs when N is narrow); only its partial last panel, whose missing rows must read as zeros, is
        // packed.
        const index_t full = mc / ks.mr * ks.mr;
        const index_t rs_a = p.trans_a ? 1 : p.lda, cs_a = p.trans_a ? p.lda : 1;
        if (full < mc) pack_a(p.trans_a, p.A, p.lda, ic + full, mc - full, pc, kc, ks.mr, abuf);
        for (index_t jr = 0; jr < nc; jr += ks.nr) {
          const int n = static_cast<int>(std::min<index_t>(ks.nr, nc - jr));
          for (index_t ir = 0; ir < mc; ir += ks.mr) {
            const int m = static_cast<int>(std::min<index_t>(ks.mr, mc - ir));
            float* c = p.C + (ic + ir) * p.ldc + jc + jr;
            const float* b = jr < b_full ? p.B + pc * p.ldb + jc + jr : bbuf + (jr - b_full) * kc;
            const index_t rs_b = jr < b_full ? p.ldb : ks.nr;
            if (ir < full)
              ks.ukernel(kc, p.A + (ic + ir) * rs_a + pc * cs_a, rs_a, cs_a, b, rs_b, c, p.ldc, !first, m, n);
            else
              ks.ukernel(kc, abuf + (ir - full) * kc, 1, ks.mr, b, rs_b, c, p.ldc, !first, m, n);
            if (last && p.epilogue) ks.epilogue(c, p.ldc, m, n, ic + ir, jc + jr, *p.epilogue);
          }
        }
      }
    }
  }
}

// Below this many multiply-adds a second thread costs more than it saves (measured: an OpenMP region
// costs a few microseconds; 2^18 FMAs take ~2 us on one AVX-512 core).
constexpr double kMinFmasPerThread = 1 << 18;

}  // namespace

void sgemm(const KernelSet& ks, bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const float* A,
           index_t lda, const float* B, index_t ldb, float* C, index_t ldc, const Epilogue* epilogue, int n_threads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, static_cast<std::size_t>(N) * sizeof(float));
    if (epilogue) ks.epilogue(C, ldc, static_cast<int>(M), static_cast<int>(N), 0, 0, *epilogue);
    return;
  }
  const Problem problem{ks, trans_a, trans_b, K, A, lda, B, ldb, C, ldc, epilogue};

  // Partition C into tm x tn rectangles of whole register tiles, one per thread, minimising the largest.
  const index_t m_tiles = ceil_div(M, ks.mr), n_tiles = ceil_div(N, ks.nr);
  const double fmas = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  int threads = resolve_threads(n_threads);
  threads = static_cast<int>(std::max(1.0, std::min<double>(threads, fmas / kMinFmasPerThread)));
  threads = static_cast<int>(std::min<index_t>(threads, m_tiles * n_tiles));
  int tm = 1, tn = 1;
  index_t best = -1;
  for (int a = 1; a <= threads; ++a) {
    if (threads % a) continue;
    const int b = threads / a;
    const index_t load = ceil_div(m_tiles, a) * ceil_div(n_tiles, b);
    if (best < 0 || load < best) best = load, tm = a, tn = b;
  }
  const index_t m_step = ceil_div(m_tiles, tm) * ks.mr, n_step = ceil_div(n_tiles, tn) * ks.nr;
  parallel_for(0, static_cast<std::int64_t>(tm) * tn, tm * tn, [&](std::int64_t t) {
    const index_t m0 = (t / tn) * m_step, n0 = (t % tn) * n_step;
    if (m0 < M && n0 < N) gemm_block(problem, m0, std::min(M, m0 + m_step), n0, std::min(N, n0 + n_step));
  });
}

}  // namespace fastrec
