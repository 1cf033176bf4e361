// Blocking loops, packing and thread partition of sgemm; the arithmetic is in the per-ISA micro-kernels.
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aligned.h"
#include "parallel.h"

namespace fastrec {

namespace {


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
  bool round_bf16 = false;  // bf16_gemm's emulated path: every panel packed, its floats rounded to bf16
};

// pack_panel's layout (kernels.h PackFn) with each float rounded to bf16: the emulated bf16 path's packing.
void pack_rounded(bool k_major, const float* src, index_t ld, int count, index_t kc, float* out, int R) {
  for (index_t k = 0; k < kc; ++k)
    for (int r = 0; r < R; ++r) {
      const float x = r >= count ? 0.0f : k_major ? src[k * ld + r] : src[r * ld + k];
      const std::uint32_t bits = bf16_round_bits(x);
      std::memcpy(out + k * R + r, &bits, sizeof(float));
    }
}

// Measured on the MLP's weight-gradient products (Xᵀ·dZ): with 4 or fewer NR panels, packing Aᵀ costs more
// than reading its rows in place saves.
constexpr index_t kMaxPanelsForInPlaceAt = 4;

// Whether the micro-kernel can apply this epilogue itself (TileExtra: everything but the addend). scale 0
// ("C is not read") stays with the epilogue too.
bool in_kernel_epilogue(const Epilogue& e) { return !e.addend && e.scale != 0.0f; }

// Up to this many rows of C are computed row by row with B read in place: packing B (K x N floats) cost more
// than the rows' products (measured on a 161 x 256 layer: 2 rows took 10 µs packed, one row 2.5 µs).
constexpr index_t kRowPathRows = 4;

// One row of C (a single prediction): no packing, the row kernel over row-major B in place, all the columns
// at once (it keeps several panels' chains in flight: one panel at a time waited on the FMA latency); the
// epilogue per nr panel, as in the blocked path.
void gemm_row(const Problem& p, index_t row, index_t n0, index_t n1) {
  const KernelSet& ks = p.ks;
  float* c = p.C + row * p.ldc + n0;
  for (index_t pc = 0; pc < p.K; pc += ks.kc) {
    const index_t kc = std::min(ks.kc, p.K - pc);
    const float* a = p.A + row * p.lda + pc;
#ifdef FASTREC_HAVE_X86_KERNELS
    // A hidden layer's input after ReLU is about half zeros: their rows of B need not be read (the one-row
    // MLP reads its weights from L2 at about 32 bytes a cycle: the rows read are its time).
    constexpr index_t kMaxNonzeroKc = 512;
    if (ks.isa == Isa::Avx512 && (n1 - n0) % 64 == 0 && kc <= kMaxNonzeroKc) {
      std::int32_t idx[kMaxNonzeroKc];
      index_t nk = 0;
      if (row_nonzeros_avx512(kc, a, idx, &nk)) {
        row_kernel_nonzero_avx512(nk, idx, a, p.B + pc * p.ldb + n0, p.ldb, c, pc > 0, static_cast<int>(n1 - n0));
        continue;
      }
    }
#endif
    ks.row_kernel(kc, a, p.B + pc * p.ldb + n0, p.ldb, c, pc > 0, static_cast<int>(n1 - n0));
  }
  if (!p.epilogue) return;
  if (!p.epilogue->exp_sums) {  // element-wise: one call over the row (per-panel calls cost ~1 µs a layer)
    ks.epilogue(c, p.ldc, 1, static_cast<int>(n1 - n0), row, n0, *p.epilogue);
    return;
  }
  for (index_t jr = n0; jr < n1; jr += ks.nr)  // exp_sums: one sum per nr-column group
    ks.epilogue(p.C + row * p.ldc + jr, p.ldc, 1, static_cast<int>(std::min<index_t>(ks.nr, n1 - jr)), row, jr,
                *p.epilogue);
}

// The five BLIS loops over one rectangle C[m0:m1, n0:n1] on the calling thread.
void gemm_block(const Problem& p, index_t m0, index_t m1, index_t n0, index_t n1) {
  thread_local AlignedBuffer a_scratch, b_scratch;  // one per thread per role: OpenMP keeps its threads
  const KernelSet& ks = p.ks;
  if (m1 - m0 <= kRowPathRows && !p.trans_a && !p.trans_b && !p.round_bf16) {
    for (index_t i = m0; i < m1; ++i) gemm_row(p, i, n0, n1);
    return;
  }
  const index_t kc_max = std::min(ks.kc, p.K);
  float* bbuf = b_scratch.get(static_cast<std::size_t>(kc_max * ceil_div(std::min(ks.nc, n1 - n0), ks.nr) * ks.nr));
  float* abuf = a_scratch.get(static_cast<std::size_t>(kc_max * ceil_div(std::min(ks.mc, m1 - m0), ks.mr) * ks.mr));
  for (index_t jc = n0; jc < n1; jc += ks.nc) {
    const index_t nc = std::min(ks.nc, n1 - jc);
    for (index_t pc = 0; pc < p.K; pc += ks.kc) {
      const index_t kc = std::min(ks.kc, p.K - pc);
      const bool first = pc == 0, last = pc + kc == p.K;
      // B is packed when several row panels reuse it (reading it in place with a power-of-two row stride
      // would map its kc rows onto a few L1 sets). For a single row panel (one-row predictions) packing would
      // cost more than the product: full panels of row-major B are then read in place.
      const bool b_in_place = !p.trans_b && m1 - m0 <= ks.mr && !p.round_bf16;
      const index_t b_full = b_in_place ? nc / ks.nr * ks.nr : 0;
      for (index_t jr = b_full; jr < nc; jr += ks.nr) {
        const int n = static_cast<int>(std::min<index_t>(ks.nr, nc - jr));
        const float* src = p.trans_b ? p.B + (jc + jr) * p.ldb + pc : p.B + pc * p.ldb + jc + jr;
        if (p.round_bf16)
          pack_rounded(!p.trans_b, src, p.ldb, n, kc, bbuf + jr * kc, ks.nr);
        else
          ks.pack_b(!p.trans_b, src, p.ldb, n, kc, bbuf + jr * kc);
      }
      for (index_t ic = m0; ic < m1; ic += ks.mc) {
        const index_t mc = std::min(ks.mc, m1 - ic);
        // Row-major A is read in place (12 rows streamed by the kernel; packing would be a transpose
        // copy costing as much as the FMAs when N is narrow). Transposed A is a contiguous run per k: read
        // in place when few B panels would reuse a packed copy, else packed. A partial last panel is always
        // packed (its missing rows must read as zeros).
        const bool a_in_place = (!p.trans_a || nc <= kMaxPanelsForInPlaceAt * ks.nr) && !p.round_bf16;
        const index_t full = a_in_place ? mc / ks.mr * ks.mr : 0;
        const index_t rs_a = p.trans_a ? 1 : p.lda, cs_a = p.trans_a ? p.lda : 1;
        for (index_t ir = full; ir < mc; ir += ks.mr) {
          const int m = static_cast<int>(std::min<index_t>(ks.mr, mc - ir));
          const float* src = p.trans_a ? p.A + pc * p.lda + ic + ir : p.A + (ic + ir) * p.lda + pc;
          if (p.round_bf16)
            pack_rounded(p.trans_a, src, p.lda, m, kc, abuf + (ir - full) * kc, ks.mr);
          else
            ks.pack_a(p.trans_a, src, p.lda, m, kc, abuf + (ir - full) * kc);
        }
        for (index_t jr = 0; jr < nc; jr += ks.nr) {
          const int n = static_cast<int>(std::min<index_t>(ks.nr, nc - jr));
          for (index_t ir = 0; ir < mc; ir += ks.mr) {
            const int m = static_cast<int>(std::min<index_t>(ks.mr, mc - ir));
            float* c = p.C + (ic + ir) * p.ldc + jc + jr;
            // An epilogue without addend (scale, bias, activation, derivative mask) runs inside the
            // micro-kernel's last call.
            TileExtra in_kernel;
            const TileExtra* finish = nullptr;
            if (last && p.epilogue && in_kernel_epilogue(*p.epilogue)) {
              const Epilogue& e = *p.epilogue;
              in_kernel.scale = e.scale;
              in_kernel.bias = e.bias ? e.bias + jc + jr : nullptr;
              in_kernel.act = e.act;
              in_kernel.mul = e.mul ? e.mul + (ic + ir) * e.ld_mul + jc + jr : nullptr;
              in_kernel.ld_mul = e.ld_mul;
              in_kernel.mul_act = e.mul_act;
              in_kernel.exp_sums = e.exp_sums ? e.exp_sums + (ic + ir) * e.ld_sums + (jc + jr) / e.sums_width : nullptr;
              in_kernel.ld_sums = e.ld_sums;
              finish = &in_kernel;
            }
            const float* b = jr < b_full ? p.B + pc * p.ldb + jc + jr : bbuf + jr * kc;
            const index_t rs_b = jr < b_full ? p.ldb : ks.nr;
            if (ir < full)
              ks.ukernel(kc, p.A + (ic + ir) * rs_a + pc * cs_a, rs_a, cs_a, b, rs_b, c, p.ldc, !first, m, n,
                         finish);
            else
              ks.ukernel(kc, abuf + (ir - full) * kc, 1, ks.mr, b, rs_b, c, p.ldc, !first, m, n, finish);
            if (last && p.epilogue && !finish) ks.epilogue(c, p.ldc, m, n, ic + ir, jc + jr, *p.epilogue);
          }
        }
      }
    }
  }
}

// Below this many multiply-adds per thread a second thread costs more than it saves. Measured with
// benchmarks' dense epochs: at 2^18 a 64-128-64 MLP at batch 128 ran 12.1 ms on 2 threads vs 9.0 ms on 1
// (waking a thread, the barrier, and under load a descheduled partner, cost more than the split saves);
// at 2^20 both take 9.1 ms and the wider points keep their 2-thread gain (25 vs 30-37 ms).
constexpr double kMinFmasPerThread = 1 << 20;
// A float packed or streamed from L2 ~ 8 FMAs' time (32 FMAs/cycle at peak vs ~4 floats/cycle copied).
constexpr index_t kPackCost = 8;

// C (M x 1) = op(A) b for a contiguous b of K floats: a matrix-vector product (an MLP's one-output layer),
// where the micro-kernel would fill 1 of its NR columns. Rows of A: a dot product per row of C; columns
// (Aᵀ): the rows of A summed with weights b. Split over threads by output rows, each summed in a fixed order.
void one_column(const KernelSet& ks, bool trans_a, index_t M, index_t K, const float* A, index_t lda, const float* b,
                float* C, const Epilogue* epilogue, int n_threads) {
  constexpr index_t kRowsPerTask = 256;
  const index_t tasks = ceil_div(M, kRowsPerTask);
  const double fmas = static_cast<double>(M) * static_cast<double>(K);
  const int threads = static_cast<int>(std::max(1.0, std::min<double>(resolve_threads(n_threads), fmas / kMinFmasPerThread)));
  thread_local std::vector<std::int32_t> ids;
  if (trans_a && static_cast<index_t>(ids.size()) < K) {
    ids.resize(static_cast<std::size_t>(K));
    for (index_t k = 0; k < K; ++k) ids[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  }
  const std::int32_t* k_ids = ids.data();
  parallel_for(0, tasks, threads, [&](std::int64_t t) {
    const index_t m0 = t * kRowsPerTask, m = std::min(kRowsPerTask, M - m0);
    if (trans_a)
      ks.row_sum(b, k_ids, K, A + m0, lda, m, C + m0);
    else
      ks.dot_rows(A + m0 * lda, lda, m, b, K, 0.0f, C + m0);
    if (epilogue) ks.epilogue(C + m0, 1, static_cast<int>(m), 1, m0, 0, *epilogue);
  });
}

// Runs block(m0, m1, n0, n1) over a partition of C (M x N, register tiles mr x nr) into one rectangle per thread.
template <typename Block>
void split_c(index_t M, index_t N, index_t K, index_t mr, index_t nr, int n_threads, Block&& block) {
  // Partition C into tm x tn rectangles of whole register tiles, one per thread, minimising the largest
  // thread's cost per unit of K: its FMAs plus the panels it packs or streams (each thread reads the
  // rows of op(A) and the columns of op(B) of its rectangle; a float moved costs about as much time as
  // kPackCost multiply-adds at full SIMD width).
  const index_t m_tiles = ceil_div(M, mr), n_tiles = ceil_div(N, nr);
  const double fmas = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  int threads = resolve_threads(n_threads);
  threads = static_cast<int>(std::max(1.0, std::min<double>(threads, fmas / kMinFmasPerThread)));
  threads = static_cast<int>(std::min<index_t>(threads, m_tiles * n_tiles));
  int tm = 1, tn = 1;
  index_t best = -1;
  for (int a = 1; a <= threads; ++a) {
    if (threads % a) continue;
    const int b = threads / a;
    const index_t rows = ceil_div(m_tiles, a) * mr, cols = ceil_div(n_tiles, b) * nr;
    const index_t load = rows * cols + kPackCost * (rows + cols);
    if (best < 0 || load < best) best = load, tm = a, tn = b;
  }
  const index_t m_step = ceil_div(m_tiles, tm) * mr, n_step = ceil_div(n_tiles, tn) * nr;
  parallel_for(0, static_cast<std::int64_t>(tm) * tn, tm * tn, [&](std::int64_t t) {
    const index_t m0 = (t / tn) * m_step, n0 = (t % tn) * n_step;
    if (m0 < M && n0 < N) block(m0, std::min(M, m0 + m_step), n0, std::min(N, n0 + n_step));
  });
}

#ifdef FASTREC_HAVE_BF16_KERNELS
// bf16_gemm's native path: BLIS loops as gemm_block with every panel packed into bf16 pairs (kernels.h).
struct Bf16Problem {
  const KernelSet& ks;
  const Bf16KernelSet& bk;
  bool trans_a, trans_b;
  index_t K;
  const float* A;
  index_t lda;
  const float* B;
  index_t ldb;
  float* C;
  index_t ldc;
  const Epilogue* epilogue;
  float* residual = nullptr;  // bf16_gemm_rows_residual: x and the mask, leading dimension ldc
  const float* drop = nullptr;
};


// B's panels of columns [jc, jc + nc) and rows [pc, pc + kc) into bbuf as bf16 pairs (pairs = ceil(kc / 2)).
void bf16_pack_b_panels(const Bf16Problem& p, index_t jc, index_t nc, index_t pc, index_t kc, index_t pairs,
                        std::uint32_t* bbuf) {
  for (index_t jr = 0; jr < nc; jr += p.bk.nr) {
    const int n = static_cast<int>(std::min<index_t>(p.bk.nr, nc - jr));
    const float* src = p.trans_b ? p.B + (jc + jr) * p.ldb + pc : p.B + pc * p.ldb + jc + jr;
    p.bk.pack_b(!p.trans_b, src, p.ldb, n, kc, bbuf + jr * pairs);
  }
}

// Whether the bf16 micro-kernels apply this epilogue themselves (kernels.h Bf16Extra): scale 1, an addend at
// scale 1, bias, ReLU, the ReLU derivative mask; not the exponentials. epilogue_impl's special case (scale 0)
// stays with the epilogue.
bool bf16_fusable(const Epilogue& e) {
  return e.scale == 1.0f && (!e.addend || e.addend_scale == 1.0f) && !e.exp_sums &&
         (e.act == Activation::Identity || e.act == Activation::Relu) &&
         (!e.mul || e.mul_act == Activation::Relu);
}

// The Bf16Extra of the tile at C's (row, col) on the call completing its sum (a fusable epilogue).
Bf16Extra bf16_extra(const Bf16Problem& p, index_t row, index_t col) {
  const Epilogue& e = *p.epilogue;
  Bf16Extra extra;
  extra.addend = e.addend ? e.addend + row * e.ld_addend + col : nullptr;
  extra.ld_addend = e.ld_addend;
  extra.bias = e.bias ? e.bias + col : nullptr;
  extra.relu = e.act == Activation::Relu;
  extra.mul = e.mul ? e.mul + row * e.ld_mul + col : nullptr;
  extra.ld_mul = e.ld_mul;
  if (p.residual) {
    extra.residual = p.residual + row * p.ldc + col;
    extra.drop = p.drop + row * p.ldc + col;
    extra.ld_residual = p.ldc;
  }
  return extra;
}

void bf16_block(const Bf16Problem& p, index_t m0, index_t m1, index_t n0, index_t n1) {
  thread_local AlignedBuffer a_scratch, b_scratch;
  const Bf16KernelSet& bk = p.bk;
  const index_t kc_step = bf16_kc_step(p.K, p.bk.kc);
  const index_t pairs_max = (std::min(kc_step, p.K) + 1) / 2;
  // A pair word has a float's size: the float buffers hold them.
  auto* bbuf = reinterpret_cast<std::uint32_t*>(
      b_scratch.get(static_cast<std::size_t>(pairs_max * ceil_div(std::min(bk.nc, n1 - n0), bk.nr) * bk.nr)));
  auto* abuf = reinterpret_cast<std::uint32_t*>(
      a_scratch.get(static_cast<std::size_t>(pairs_max * ceil_div(std::min(bk.mc, m1 - m0), bk.mr) * bk.mr)));
  for (index_t jc = n0; jc < n1; jc += bk.nc) {
    const index_t nc = std::min(bk.nc, n1 - jc);
    for (index_t pc = 0; pc < p.K; pc += kc_step) {
      const index_t kc = std::min(kc_step, p.K - pc), pairs = (kc + 1) / 2;
      const bool first = pc == 0, last = pc + kc == p.K;
      bf16_pack_b_panels(p, jc, nc, pc, kc, pairs, bbuf);
      for (index_t ic = m0; ic < m1; ic += bk.mc) {
        const index_t mc = std::min(bk.mc, m1 - ic);
        for (index_t ir = 0; ir < mc; ir += bk.mr) {
          const int m = static_cast<int>(std::min<index_t>(bk.mr, mc - ir));
          const float* src = p.trans_a ? p.A + pc * p.lda + ic + ir : p.A + (ic + ir) * p.lda + pc;
          bk.pack_a(p.trans_a, src, p.lda, m, kc, abuf + ir * pairs);
        }
        for (index_t jr = 0; jr < nc; jr += bk.nr) {
          const int n = static_cast<int>(std::min<index_t>(bk.nr, nc - jr));
          for (index_t ir = 0; ir < mc; ir += bk.mr) {
            const int m = static_cast<int>(std::min<index_t>(bk.mr, mc - ir));
            float* c = p.C + (ic + ir) * p.ldc + jc + jr;
            const bool fused = last && p.epilogue && bf16_fusable(*p.epilogue);
            const Bf16Extra extra = fused ? bf16_extra(p, ic + ir, jc + jr) : Bf16Extra{};
            bk.ukernel(pairs, abuf + ir * pairs, bbuf + jr * pairs, c, p.ldc, !first, m, n, fused ? &extra : nullptr);
            if (last && p.epilogue && !fused) p.ks.epilogue(c, p.ldc, m, n, ic + ir, jc + jr, *p.epilogue);
          }
        }
      }
    }
  }
}

// bf16_gemm_rows' loops: bf16_block's, with each mc block of A's rows converted to bf16 rows (Bf16RowsKernels)
// instead of packed into MR panels. The same pair sums in the same order: bf16_block's bits.
void bf16_rows_block(const Bf16Problem& p, const Bf16RowsKernels& rk, index_t m0, index_t m1, index_t n0,
                     index_t n1) {
  thread_local AlignedBuffer a_scratch, b_scratch;
  const Bf16KernelSet& bk = p.bk;
  const index_t kc_step = bf16_kc_step(p.K, p.bk.kc);
  const index_t pairs_max = (std::min(kc_step, p.K) + 1) / 2;
  auto* bbuf = reinterpret_cast<std::uint32_t*>(
      b_scratch.get(static_cast<std::size_t>(pairs_max * ceil_div(std::min(bk.nc, n1 - n0), bk.nr) * bk.nr)));
  auto* abuf = reinterpret_cast<std::uint32_t*>(
      a_scratch.get(static_cast<std::size_t>(pairs_max * std::min(bk.mc, m1 - m0))));
  for (index_t jc = n0; jc < n1; jc += bk.nc) {
    const index_t nc = std::min(bk.nc, n1 - jc);
    for (index_t pc = 0; pc < p.K; pc += kc_step) {
      const index_t kc = std::min(kc_step, p.K - pc), pairs = (kc + 1) / 2;
      const bool first = pc == 0, last = pc + kc == p.K;
      bf16_pack_b_panels(p, jc, nc, pc, kc, pairs, bbuf);
      for (index_t ic = m0; ic < m1; ic += bk.mc) {
        const index_t mc = std::min(bk.mc, m1 - ic);
        rk.convert(p.A + ic * p.lda + pc, p.lda, mc, kc, abuf, pairs);
        for (index_t jr = 0; jr < nc; jr += bk.nr) {
          const int n = static_cast<int>(std::min<index_t>(bk.nr, nc - jr));
          for (index_t ir = 0; ir < mc; ir += bk.mr) {
            const int m = static_cast<int>(std::min<index_t>(bk.mr, mc - ir));
            float* c = p.C + (ic + ir) * p.ldc + jc + jr;
            const bool fused = last && p.epilogue && bf16_fusable(*p.epilogue);
            const Bf16Extra extra = fused ? bf16_extra(p, ic + ir, jc + jr) : Bf16Extra{};
            rk.ukernel(pairs, abuf + ir * pairs, pairs, bbuf + jr * pairs, c, p.ldc, !first, m, n,
                       fused ? &extra : nullptr);
            if (last && p.epilogue && !fused) p.ks.epilogue(c, p.ldc, m, n, ic + ir, jc + jr, *p.epilogue);
          }
        }
      }
    }
  }
}
#endif

}  // namespace

void bf16_gemm_rows(const KernelSet& ks, bool native, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
                    const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc,
                    const Epilogue* epilogue, int n_threads) {
#ifdef FASTREC_HAVE_BF16_KERNELS
  if (native && !trans_a && M > 0 && N > 0 && K > 0) {
    require(!epilogue || !epilogue->exp_sums, "bf16_gemm: the exp_sums epilogue is not supported");
    require(bf16_native_available(), "bf16_gemm: the AVX512-BF16 kernel is not available on this CPU");
    const Bf16KernelSet& bk = bf16_kernels_avx512();
    const Bf16RowsKernels& rk = bf16_rows_kernels_avx512();
    const Bf16Problem problem{ks, bk, trans_a, trans_b, K, A, lda, B, ldb, C, ldc, epilogue};
    split_c(M, N, K, bk.mr, bk.nr, n_threads, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
      bf16_rows_block(problem, rk, m0, m1, n0, n1);
    });
    return;
  }
#endif
  bf16_gemm(ks, native, trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, epilogue, n_threads);
}

bool bf16_gemm_rows_residual(const KernelSet& ks, bool native, index_t M, index_t N, index_t K, const float* A,
                             index_t lda, const float* B, index_t ldb, const float* bias, const float* mask, float* x,
                             index_t ld_x, int n_threads) {
#ifdef FASTREC_HAVE_BF16_KERNELS
  if (!native || M <= 0 || N <= 0 || K <= 0) return false;
  require(bf16_native_available(), "bf16_gemm: the AVX512-BF16 kernel is not available on this CPU");
  const Bf16KernelSet& bk = bf16_kernels_avx512();
  if (K > bk.kc) return false;
  const Bf16RowsKernels& rk = bf16_rows_kernels_avx512();
  Epilogue e;  // bias only: the kernel's extra then carries the residual (C itself is not written)
  e.bias = bias;
  Bf16Problem problem{ks, bk, false, false, K, A, lda, B, ldb, x, ld_x, &e};
  problem.residual = x;
  problem.drop = mask;
  split_c(M, N, K, bk.mr, bk.nr, n_threads, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    bf16_rows_block(problem, rk, m0, m1, n0, n1);
  });
  return true;
#else
  (void)ks, (void)native, (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)bias, (void)mask,
      (void)x, (void)ld_x, (void)n_threads;
  return false;
#endif
}

void bf16_gemm(const KernelSet& ks, bool native, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
               const float* A, index_t lda, const float* B, index_t ldb, float* C, index_t ldc, const Epilogue* epilogue,
               int n_threads) {
  require(!epilogue || !epilogue->exp_sums, "bf16_gemm: the exp_sums epilogue is not supported");
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, static_cast<std::size_t>(N) * sizeof(float));
    if (epilogue) ks.epilogue(C, ldc, static_cast<int>(M), static_cast<int>(N), 0, 0, *epilogue);
    return;
  }
#ifdef FASTREC_HAVE_BF16_KERNELS
  if (native) {
    require(bf16_native_available(), "bf16_gemm: the AVX512-BF16 kernel is not available on this CPU");
    const Bf16KernelSet& bk = bf16_kernels_avx512();
    const Bf16Problem problem{ks, bk, trans_a, trans_b, K, A, lda, B, ldb, C, ldc, epilogue};
    split_c(M, N, K, bk.mr, bk.nr, n_threads, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
      bf16_block(problem, m0, m1, n0, n1);
    });
    return;
  }
#else
  require(!native, "bf16_gemm: this build has no AVX512-BF16 kernel");
#endif
  Problem problem{ks, trans_a, trans_b, K, A, lda, B, ldb, C, ldc, epilogue};
  problem.round_bf16 = true;
  split_c(M, N, K, ks.mr, ks.nr, n_threads, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_block(problem, m0, m1, n0, n1);
  });
}

void sgemm_row(const KernelSet& ks, index_t N, index_t K, const float* a, const float* B, index_t ldb, float* c,
               const Epilogue* epilogue) {
  if (N <= 0) return;
  if (K <= 0 || N == 1) return sgemm(ks, false, false, 1, N, K, a, K, B, ldb, c, N, epilogue, 1);
  const Problem problem{ks, false, false, K, a, K, B, ldb, c, N, epilogue};
  gemm_row(problem, 0, 0, N);
}

void sgemm(const KernelSet& ks, bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const float* A,
           index_t lda, const float* B, index_t ldb, float* C, index_t ldc, const Epilogue* epilogue, int n_threads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (index_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, static_cast<std::size_t>(N) * sizeof(float));
    if (epilogue) ks.epilogue(C, ldc, static_cast<int>(M), static_cast<int>(N), 0, 0, *epilogue);
    return;
  }
  if (N == 1 && ldc == 1 && (trans_b || ldb == 1)) return one_column(ks, trans_a, M, K, A, lda, B, C, epilogue, n_threads);
  const Problem problem{ks, trans_a, trans_b, K, A, lda, B, ldb, C, ldc, epilogue};
  split_c(M, N, K, ks.mr, ks.nr, n_threads, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_block(problem, m0, m1, n0, n1);
  });
}

index_t bf16_kc_step(index_t K, index_t kc) {
  const index_t blocks = ceil_div(K, kc);
  return std::min(kc, (ceil_div(K, blocks) + 1) / 2 * 2);
}

}  // namespace fastrec
