// Exact inner-product top-k (contract in topk.h).
//
// Two ways to score, both the micro-kernel's FMA chain over k per score (so the same bits):
//  - many queries ("tiles"): C tile = MR items x NR queries = ks.ukernel with the items read in place as
//    its row-major A (no copy of the item matrix) and the queries packed once into NR-column B panels.
//    Loops, BLIS style: an MC-item block of the item matrix stays in L2 while every packed query panel
//    (L1) of the task's query group runs over its MR-item micro-panels. Each finished tile is selected
//    while it is in L1: per item row, one vector compare of its NR scores against the NR queries'
//    thresholds (the k-th best score so far, -inf until k items are held); only lanes that pass go to the
//    exact check and insertion.
//  - a few queries ("chains"): ks.chain_dots, one query against a block of item rows read in place, 16
//    rows transposed into the 16 lanes of a vector and one FMA per k: the micro-kernel's chain per score.
//    Memory-bound: each item row is read once from memory for all queries, and the transposes and FMAs
//    (~4.2 ns per item and query on one AVX-512 core at dim 64) hide behind the stream.
// Per query the k best so far are a sorted array (best first) under the total order (score desc, item asc);
// an entry enters by binary search and a shift. Because the order is total and every score is the same bits
// however it was computed, the k best are the same however the items are split: threads scan item chunks
// with their own arrays (few queries) or own whole query groups (many), and chunk results are merged by
// the same insertion.
#include "topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"

namespace fastrec {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();


// Up to this many queries score by chains (ks.chain_dots, one query at a time over a block of item rows);
// more go through tiles. Measured on 10^6 x 64 items, AVX-512, one thread: chains take ~10 ms for 1 query,
// 21 for 2, 29 for 3, 33 for 4; tiles ~32 ms for any 1..16 (their half-width path costs one full FMA per item
// and k for up to 16 queries).
constexpr index_t kChainMaxQueries = 3;
// Items per block of the chain path: 64 KiB at dim 64, in L2 while the few queries run over it.
constexpr index_t kChainBlock = 256;
// The chain kernel reads 32 rows at a time, 16 bytes of each in turn: 32 interleaved streams, which the
// L2 stream prefetcher did not follow (one thread scanned 10^6 x 64 items at ~7 GB/s, the L1 miss buffers
// the limit). Reading one float per line of the next kTouchRows rows in address order first (32 rows, 8 KiB
// at dim 64) makes the misses sequential; the streamer then runs ahead and one thread reached ~24 GB/s of
// the ~29 GB/s its plain sum reads. Software prefetches (any distance, any locality) reached only ~12 GB/s.
// A multiple of 32: the kernel's widest row block.
constexpr index_t kTouchRows = 32;
// A query group's packed panels (dim x NR floats each) should stay in L2 (1 MiB here) next to an MC-item
// block: ~256 KiB, 1024 queries at dim 64.
constexpr index_t kGroupBytes = 256 * 1024;
// Below this many multiply-adds per thread a second thread costs more than it saves (gemm.cpp's figure).
constexpr double kMinFmasPerThread = 1 << 20;
// Item chunks of the parallel item split: at least this many items (a chunk's fixed cost is packing the
// query group and a few partial blocks) and about kChunksPerThread per thread, so that a thread slowed by
// another process does fewer.
constexpr index_t kMinChunkItems = 4096;
constexpr index_t kChunksPerThread = 8;

bool better(float sa, std::int32_t ia, float sb, std::int32_t ib) { return sa > sb || (sa == sb && ia < ib); }

// Whether any of s[0:n] >= t[0:n] (n a multiple of 4): baseline SSE vectors via GCC's vector extension.
typedef float f32x4 __attribute__((vector_size(16)));
typedef std::int32_t i32x4 __attribute__((vector_size(16)));
inline bool any_ge(const float* s, const float* t, int n) {
  i32x4 acc = {0, 0, 0, 0};
  for (int j = 0; j < n; j += 4) {
    f32x4 a, b;
    std::memcpy(&a, s + j, sizeof a);
    std::memcpy(&b, t + j, sizeof b);
    acc |= a >= b;
  }
  return (acc[0] | acc[1] | acc[2] | acc[3]) != 0;
}
inline bool any_ge(const float* s, float t, int n) {
  const f32x4 b = {t, t, t, t};
  i32x4 acc = {0, 0, 0, 0};
  for (int j = 0; j < n; j += 4) {
    f32x4 a;
    std::memcpy(&a, s + j, sizeof a);
    acc |= a >= b;
  }
  return (acc[0] | acc[1] | acc[2] | acc[3]) != 0;
}

// The k best (score, item) so far of each of n_queries queries, sorted best first, and each query's
// threshold: a score below it cannot enter (-inf until k are held, then the k-th score). Thresholds past
// n_queries (up to `padded`, the queries' NR-panel padding) are +inf, so vector compares may read them.
class Best {
 public:
  Best(index_t n_queries, index_t padded, index_t k)
      : k_(k), score_(static_cast<std::size_t>(n_queries * k)), item_(static_cast<std::size_t>(n_queries * k)),
        count_(static_cast<std::size_t>(n_queries), 0), thr_(static_cast<std::size_t>(padded), kInf) {
    std::fill_n(thr_.begin(), n_queries, -kInf);
  }
  const float* thresholds() const { return thr_.data(); }
  float threshold(index_t q) const { return thr_[static_cast<std::size_t>(q)]; }

  // Inserts (s, item) if it is among query q's k best; an entry equal to one held (the same candidate
  // listed twice) is dropped. s must not be NaN (callers pass only scores >= the threshold).
  void offer(index_t q, float s, std::int32_t item) {
    float* S = score_.data() + q * k_;
    std::int32_t* I = item_.data() + q * k_;
    index_t& c = count_[static_cast<std::size_t>(q)];
    index_t lo = 0, hi = c;  // p = how many held entries are better than the new one
    while (lo < hi) {
      const index_t mid = (lo + hi) / 2;
      if (better(S[mid], I[mid], s, item))
        lo = mid + 1;
      else
        hi = mid;
    }
    const index_t p = lo;
    if (p >= k_ || (p < c && S[p] == s && I[p] == item)) return;
    const index_t moved = std::min(c, k_ - 1) - p;  // entries [p, p + moved) shift down by one
    if (moved > 0) {
      std::memmove(S + p + 1, S + p, sizeof(float) * static_cast<std::size_t>(moved));
      std::memmove(I + p + 1, I + p, sizeof(std::int32_t) * static_cast<std::size_t>(moved));
    }
    S[p] = s;
    I[p] = item;
    if (c < k_) ++c;
    if (c == k_) thr_[static_cast<std::size_t>(q)] = S[k_ - 1];
  }

  // Every entry of query q offered to `to`.
  void merge_into(index_t q, Best& to) const {
    for (index_t j = 0; j < count_[static_cast<std::size_t>(q)]; ++j)
      to.offer(q, score_[static_cast<std::size_t>(q * k_ + j)], item_[static_cast<std::size_t>(q * k_ + j)]);
  }

  void write(index_t q, std::int32_t* items, float* scores) const {
    const index_t c = count_[static_cast<std::size_t>(q)];
    for (index_t j = 0; j < k_; ++j) {
      items[j] = j < c ? item_[static_cast<std::size_t>(q * k_ + j)] : -1;
      scores[j] = j < c ? score_[static_cast<std::size_t>(q * k_ + j)] : -kInf;
    }
  }

 private:
  index_t k_;
  std::vector<float> score_;
  std::vector<std::int32_t> item_;
  std::vector<index_t> count_;
  std::vector<float> thr_;
};

struct Problem {
  const KernelSet& ks;
  const float* queries;
  index_t ld_q;
  const float* items;
  index_t ld_i, dim;
  const std::int32_t* candidates;
  const std::int64_t* excl_indptr;
  const std::int32_t* excl_items;
  const std::int32_t* excl_rows;
  std::int32_t first_item;  // without candidates: the id of items' first row

  std::int32_t item_at(index_t pos) const {
    return candidates ? candidates[pos] : static_cast<std::int32_t>(first_item + pos);
  }

  // A score that passed q's threshold: offered unless the item is excluded for q.
  void offer(Best& best, index_t q, float s, std::int32_t item) const {
    if (excl_indptr) {
      const index_t r = excl_rows ? excl_rows[q] : q;
      if (std::binary_search(excl_items + excl_indptr[r], excl_items + excl_indptr[r + 1], item)) return;
    }
    best.offer(q, s, item);
  }

  // The micro-kernel's chain over dim in ks.kc chunks, chunk results added in order (as sgemm and gemm_row
  // do): at least one call, so dim = 0 gives zeros.
  template <class Call>
  void over_k(Call&& call) const {
    index_t pc = 0;
    do {
      const index_t kc = std::min(ks.kc, dim - pc);
      call(pc, kc, pc > 0);
      pc += kc;
    } while (pc < dim);
  }
};

// Queries [q0, q1) against item positions [c0, c1) through micro-kernel tiles, into best.
void scan_tiles(const Problem& p, index_t q0, index_t q1, index_t c0, index_t c1, Best& best) {
  const KernelSet& ks = p.ks;
  const int MR = ks.mr, NR = ks.nr;
  const index_t dim = p.dim, ld_buf = std::max<index_t>(dim, 1), MC = ks.mc;
  const index_t panels = ceil_div(q1 - q0, NR);
  std::vector<float> qpanels(static_cast<std::size_t>(panels * NR * ld_buf));
  for (index_t j = 0; j < panels; ++j) {
    const int count = static_cast<int>(std::min<index_t>(NR, q1 - q0 - j * NR));
    ks.pack_b(false, p.queries + (q0 + j * NR) * p.ld_q, p.ld_q, count, dim, qpanels.data() + j * NR * ld_buf);
  }
  // Rows the kernel cannot read in place (a block's last partial micro-panel; gathered candidates),
  // zero-padded to whole micro-panels: the kernel reads all MR rows.
  std::vector<float> gathered(static_cast<std::size_t>((MC + MR) * ld_buf));
  std::vector<float> tile(static_cast<std::size_t>(MR * NR), 0.0f);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(MC));
  for (index_t ic = c0; ic < c1; ic += MC) {
    const index_t rows = std::min(MC, c1 - ic);
    for (index_t r = 0; r < rows; ++r) ids[static_cast<std::size_t>(r)] = p.item_at(ic + r);
    const index_t full = p.candidates ? 0 : rows / MR * MR;  // rows read in place
    const float* in_place = p.candidates ? nullptr : p.items + ic * p.ld_i;
    const index_t padded_rows = ceil_div(rows - full, MR) * MR;
    for (index_t r = full; r < full + padded_rows; ++r) {
      float* dst = gathered.data() + (r - full) * ld_buf;
      if (r < rows)
        std::memcpy(dst,
                    p.candidates ? p.items + static_cast<index_t>(ids[static_cast<std::size_t>(r)]) * p.ld_i
                                 : in_place + r * p.ld_i,
                    sizeof(float) * static_cast<std::size_t>(dim));
      else
        std::fill_n(dst, dim, 0.0f);
    }
    for (index_t jp = 0; jp < panels; ++jp) {
      const float* b = qpanels.data() + jp * NR * ld_buf;
      const index_t qbase = q0 + jp * NR;
      const int n = static_cast<int>(std::min<index_t>(NR, q1 - qbase));
      const float* thr = best.thresholds() + qbase;  // updated in place by offer
      for (index_t ir = 0; ir < rows; ir += MR) {
        const int m = static_cast<int>(std::min<index_t>(MR, rows - ir));
        const float* a = ir < full ? in_place + ir * p.ld_i : gathered.data() + (ir - full) * ld_buf;
        const index_t rs_a = ir < full ? p.ld_i : ld_buf;
        p.over_k([&](index_t pc, index_t kc, bool acc) {
          ks.ukernel(kc, a + pc, rs_a, 1, b + pc * NR, NR, tile.data(), NR, acc, m, n, nullptr);
        });
        for (int r = 0; r < m; ++r) {
          const float* s = tile.data() + r * NR;
          if (!any_ge(s, thr, NR)) continue;  // columns >= n: stale values against +inf or others' thresholds
          const std::int32_t item = ids[static_cast<std::size_t>(ir + r)];
          for (int j = 0; j < n; ++j)
            if (s[j] >= thr[j]) p.offer(best, qbase + j, s[j], item);
        }
      }
    }
  }
}

// Queries [q0, q1) (a few) against item positions [c0, c1): blocks of kChainBlock item rows scored by
// ks.chain_dots, one query at a time (the block stays in L2 for the next query).
void scan_chains(const Problem& p, index_t q0, index_t q1, index_t c0, index_t c1, Best& best) {
  const KernelSet& ks = p.ks;
  const index_t dim = p.dim, ld_buf = std::max<index_t>(dim, 1);
  const std::uintptr_t row_bytes = static_cast<std::uintptr_t>(dim) * sizeof(float);
  std::vector<float> gathered, scores(static_cast<std::size_t>(kChainBlock));
  if (p.candidates) gathered.resize(static_cast<std::size_t>(kChainBlock * ld_buf));
  for (index_t ic = c0; ic < c1; ic += kChainBlock) {
    const index_t rows = std::min(kChainBlock, c1 - ic);
    const float* x = p.candidates ? gathered.data() : p.items + ic * p.ld_i;
    const index_t ld = p.candidates ? ld_buf : p.ld_i;
    if (p.candidates)
      for (index_t r = 0; r < rows; ++r)
        std::memcpy(gathered.data() + r * ld_buf, p.items + static_cast<index_t>(p.candidates[ic + r]) * p.ld_i,
                    sizeof(float) * static_cast<std::size_t>(dim));
    for (index_t q = q0; q < q1; ++q) {
      const float* query = p.queries + q * p.ld_q;
      for (index_t s0 = 0; s0 < rows; s0 += kTouchRows) {
        const index_t sub = std::min(kTouchRows, rows - s0);
        if (q == q0 && !p.candidates)  // first read of these rows: from memory, touched in address order
          for (index_t r = s0; r < s0 + sub; ++r) {
            // Every line the row touches (rows need not start on a line: NumPy's data is 16-byte aligned).
            const std::uintptr_t row = reinterpret_cast<std::uintptr_t>(x + r * ld);
            for (std::uintptr_t a = row; a < row + row_bytes; a = (a & ~std::uintptr_t{63}) + 64) {
              std::int32_t v;
              std::memcpy(&v, reinterpret_cast<const char*>(a), sizeof v);
              asm volatile("" : : "r"(v));  // a real load, kept (a prefetch instruction did not train the streamer)
            }
          }
        p.over_k([&](index_t pc, index_t kc, bool acc) {
          ks.chain_dots(kc, x + s0 * ld + pc, ld, sub, query + pc, scores.data() + s0, acc);
        });
      }
      for (index_t j = 0; j < rows; j += 16) {
        const int m = static_cast<int>(std::min<index_t>(16, rows - j));
        if (m == 16 && !any_ge(scores.data() + j, best.threshold(q), 16)) continue;
        for (int r = 0; r < m; ++r)
          if (scores[static_cast<std::size_t>(j + r)] >= best.threshold(q))
            p.offer(best, q, scores[static_cast<std::size_t>(j + r)], p.item_at(ic + j + r));
      }
    }
  }
}

}  // namespace

void inner_product_topk(const KernelSet& ks, const float* queries, index_t n_queries, index_t ld_q,
                        const float* items, index_t n_items, index_t ld_i, index_t dim,
                        const std::int32_t* candidates, index_t n_candidates,
                        const std::int64_t* excl_indptr, const std::int32_t* excl_items, const std::int32_t* excl_rows,
                        index_t k, std::int32_t* out_items, float* out_scores, int n_threads) {
  require(k >= 1, "k must be >= 1");
  require(n_queries >= 0 && n_items >= 0 && dim >= 0 && (!candidates || n_candidates >= 0),
          "inner_product_topk: negative size");
  if (n_queries == 0) return;
  // Consecutive candidates (every item but a leading unknown-item row: the usual call) are read in place,
  // as the table they are: gathering them cost 5x the time of one user's scan.
  std::int32_t first_item = 0;
  if (candidates && n_candidates > 0) {
    index_t i = 1;
    while (i < n_candidates && candidates[i] == candidates[i - 1] + 1) ++i;
    if (i == n_candidates) {
      first_item = candidates[0];
      items += static_cast<index_t>(first_item) * ld_i;
      n_items = n_candidates;
      candidates = nullptr;
    }
  }
  const index_t n = candidates ? n_candidates : n_items;
  const Problem p{ks, queries, ld_q, items, ld_i, dim, candidates, excl_indptr, excl_items, excl_rows, first_item};
  const index_t NR = ks.nr;
  const bool chains = n_queries <= kChainMaxQueries;
  const index_t padded = ceil_div(n_queries, NR) * NR;

  const double fmas =
      static_cast<double>(n_queries) * static_cast<double>(n) * static_cast<double>(std::max<index_t>(dim, 1));
  // The call is one batch of the process's inner-product top-k calls, whose thread count is chosen by
  // measurement (parallel.h; calls of under 2 kMinFmasPerThread use one thread anyway).
  static SharedThreadChoice choice;
  const SharedThreadChoice::Batch batch(choice, n_threads, n_queries * n,
                                        static_cast<index_t>(2 * kMinFmasPerThread) / std::max<index_t>(dim, 1));
  const int threads =
      static_cast<int>(std::max(1.0, std::min<double>(batch.threads(), fmas / kMinFmasPerThread)));
  // Query groups of whole NR panels: as many as threads when there are enough panels, each small enough to
  // stay in L2.
  const index_t panels = ceil_div(n_queries, NR);
  const index_t max_group = std::max<index_t>(1, kGroupBytes / (NR * std::max<index_t>(dim, 1) * 4));
  const index_t group_panels = chains ? panels : std::max<index_t>(1, std::min(max_group, ceil_div(panels, threads)));
  const index_t group = group_panels * NR, n_groups = ceil_div(n_queries, group);
  auto scan = [&](index_t g, index_t c0, index_t c1, Best& best) {
    const index_t q0 = g * group, q1 = std::min(n_queries, q0 + group);
    if (chains)
      scan_chains(p, q0, q1, c0, c1, best);
    else
      scan_tiles(p, q0, q1, c0, c1, best);
  };

  if (n_groups >= threads || threads == 1) {
    // Each query group scans every item on one thread: a query's k best are held by one thread only.
    Best best(n_queries, padded, k);
    parallel_for<true>(0, n_groups, threads, [&](std::int64_t g) { scan(g, 0, n, best); });
    for (index_t q = 0; q < n_queries; ++q) best.write(q, out_items + q * k, out_scores + q * k);
    return;
  }
  // Few queries: items split into chunks (about kChunksPerThread per thread, in whole blocks), each thread
  // with its own k best of every query, merged at the end.
  const index_t unit = chains ? kChainBlock : ks.mc;
  const index_t chunk = std::max(kMinChunkItems, ceil_div(ceil_div(n, threads * kChunksPerThread), unit) * unit);
  const index_t n_chunks = std::max<index_t>(1, ceil_div(n, chunk));
  std::vector<Best> per_thread;
  per_thread.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) per_thread.emplace_back(n_queries, padded, k);
  parallel_for<true>(0, n_groups * n_chunks, threads, [&](std::int64_t task) {
    const index_t g = task / n_chunks, c = task % n_chunks;
    // (A loop run serially, on the caller's thread, may see that thread's id in an enclosing team.)
    Best& own = per_thread[static_cast<std::size_t>(std::min(thread_id(), threads - 1))];
    scan(g, c * chunk, std::min(n, (c + 1) * chunk), own);
  });
  Best best(n_queries, padded, k);
  for (index_t q = 0; q < n_queries; ++q) {
    for (const Best& b : per_thread) b.merge_into(q, best);
    best.write(q, out_items + q * k, out_scores + q * k);
  }
}

}  // namespace fastrec
