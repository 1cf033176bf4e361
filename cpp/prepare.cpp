#include "prepare.h"

#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kernels/kernels.h"
#include "parallel.h"

namespace fastrec {

namespace {

// zlib's CRC-32 tables for slicing by 8: t[0] is the byte-at-a-time table, t[k][i] the CRC of byte i followed by
// k zero bytes, so eight bytes are folded in by eight independent lookups instead of a chain of eight.
using CrcTables = std::array<std::array<std::uint32_t, 256>, 8>;
const CrcTables& crc_tables() {
  static const CrcTables tables = [] {
    CrcTables t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1U) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (std::size_t k = 1; k < 8; ++k)
      for (std::size_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFU];
    return t;
  }();
  return tables;
}

std::int32_t bucket(std::uint32_t crc, std::int64_t buckets) {  // buckets < 2**31: a 32-bit division
  return static_cast<std::int32_t>(crc % static_cast<std::uint32_t>(buckets) + 1);
}

// UTF-8 of one code point into out (at most 4 bytes); returns the bytes written.
int utf8(std::uint32_t c, unsigned char* out) {
  if (c < 0x80) {
    out[0] = static_cast<unsigned char>(c);
    return 1;
  }
  if (c < 0x800) {
    out[0] = static_cast<unsigned char>(0xC0 | (c >> 6));
    out[1] = static_cast<unsigned char>(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    out[0] = static_cast<unsigned char>(0xE0 | (c >> 12));
    out[1] = static_cast<unsigned char>(0x80 | ((c >> 6) & 0x3F));
    out[2] = static_cast<unsigned char>(0x80 | (c & 0x3F));
    return 3;
  }
  out[0] = static_cast<unsigned char>(0xF0 | ((c >> 18) & 0x07));
  out[1] = static_cast<unsigned char>(0x80 | ((c >> 12) & 0x3F));
  out[2] = static_cast<unsigned char>(0x80 | ((c >> 6) & 0x3F));
  out[3] = static_cast<unsigned char>(0x80 | (c & 0x3F));
  return 4;
}

constexpr index_t kGrain = 4096;  // values per parallel chunk: hashing one takes tens of nanoseconds

}  // namespace

std::uint32_t crc32(const unsigned char* data, std::size_t size) {
  const CrcTables& t = crc_tables();
  std::uint32_t c = 0xFFFFFFFFU;
  std::size_t i = 0;
  for (; i + 8 <= size; i += 8) {  // the bytes as two little-endian words, whatever the host's byte order
    const std::uint32_t lo = c ^ (std::uint32_t{data[i]} | std::uint32_t{data[i + 1]} << 8 |
                                  std::uint32_t{data[i + 2]} << 16 | std::uint32_t{data[i + 3]} << 24);
    const std::uint32_t hi = std::uint32_t{data[i + 4]} | std::uint32_t{data[i + 5]} << 8 |
                             std::uint32_t{data[i + 6]} << 16 | std::uint32_t{data[i + 7]} << 24;
    c = t[7][lo & 0xFFU] ^ t[6][(lo >> 8) & 0xFFU] ^ t[5][(lo >> 16) & 0xFFU] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFFU] ^ t[2][(hi >> 8) & 0xFFU] ^ t[1][(hi >> 16) & 0xFFU] ^ t[0][hi >> 24];
  }
  for (; i < size; ++i) c = t[0][(c ^ data[i]) & 0xFFU] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

void hash_int64(const std::int64_t* values, index_t n, std::int64_t buckets, std::int32_t* out, int n_threads) {
  require(buckets >= 1 && buckets < (std::int64_t{1} << 31) - 1, "hash buckets must be in [1, 2**31 - 2]");
  const index_t chunks = ceil_div(n, kGrain);
  parallel_for(0, chunks, chunks > 1 ? n_threads : 1, [&](index_t c) {
    char text[24];
    for (index_t i = c * kGrain, end = std::min(n, i + kGrain); i < end; ++i) {
      const auto res = std::to_chars(text, text + sizeof(text), values[i]);
      out[i] = bucket(crc32(reinterpret_cast<const unsigned char*>(text), static_cast<std::size_t>(res.ptr - text)),
                      buckets);
    }
  });
}

void hash_ucs4(const std::uint32_t* values, index_t n, index_t width, std::int64_t buckets, std::int32_t* out,
               int n_threads) {
  require(buckets >= 1 && buckets < (std::int64_t{1} << 31) - 1, "hash buckets must be in [1, 2**31 - 2]");
  require(width >= 0, "string width must be non-negative");
  const index_t chunks = ceil_div(n, kGrain);
  parallel_for(0, chunks, chunks > 1 ? n_threads : 1, [&](index_t c) {
    const auto& t = crc_tables()[0];
    for (index_t i = c * kGrain, end = std::min(n, i + kGrain); i < end; ++i) {
      const std::uint32_t* s = values + i * width;
      index_t len = width;
      while (len > 0 && s[len - 1] == 0) --len;
      std::uint32_t crc = 0xFFFFFFFFU;
      unsigned char bytes[4];
      for (index_t j = 0; j < len; ++j) {
        const int m = utf8(s[j], bytes);
        for (int b = 0; b < m; ++b) crc = t[(crc ^ bytes[b]) & 0xFFU] ^ (crc >> 8);
      }
      out[i] = bucket(crc ^ 0xFFFFFFFFU, buckets);
    }
  });
}

void unique_int64(const std::int64_t* values, index_t n, std::vector<std::int64_t>& unique, std::int32_t* codes) {
  require(n < (index_t{1} << 31) - 1, "more than 2**31 - 2 values to index");
  unique.clear();
  if (n == 0) return;
  struct Entry {
    std::uint64_t key;  // the value with its sign bit flipped: unsigned order = signed order
    std::int32_t pos;
  };
  std::vector<Entry> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    a[static_cast<std::size_t>(i)] = {static_cast<std::uint64_t>(values[i]) ^ (std::uint64_t{1} << 63),
                                      static_cast<std::int32_t>(i)};
  std::vector<index_t> count(65536);
  for (int shift = 0; shift < 64; shift += 16) {
    std::fill(count.begin(), count.end(), 0);
    for (const Entry& e : a) ++count[(e.key >> shift) & 0xFFFFU];
    if (count[(a[0].key >> shift) & 0xFFFFU] == n) continue;  // every value has this digit: order unchanged
    index_t start = 0;
    for (auto& c : count) {
      const index_t k = c;
      c = start;
      start += k;
    }
    for (const Entry& e : a) b[static_cast<std::size_t>(count[(e.key >> shift) & 0xFFFFU]++)] = e;
    a.swap(b);
  }
  for (index_t i = 0; i < n; ++i) {
    const Entry& e = a[static_cast<std::size_t>(i)];
    if (i == 0 || e.key != a[static_cast<std::size_t>(i - 1)].key)
      unique.push_back(static_cast<std::int64_t>(e.key ^ (std::uint64_t{1} << 63)));
    codes[e.pos] = static_cast<std::int32_t>(unique.size());
  }
}

void fill_normal(const KernelSet& ks, std::uint64_t seed, index_t first, index_t n, float loc, float scale,
                 float* out, int n_threads) {
  const index_t chunks = ceil_div(n, 65536);
  parallel_for<true>(0, chunks, chunks > 1 ? n_threads : 1, [&](index_t ch) {
    const index_t i = ch * 65536;
    ks.fill_normal(seed, static_cast<std::uint64_t>(first + i), std::min<index_t>(65536, n - i), loc, scale, out + i);
  });
}

template <class T>
int standardize(const KernelSet& ks, const T* values, index_t n, index_t c, bool fit, double* mean, double* std,
                float* out, int n_threads) {
  constexpr index_t kBlock = 65536;
  const index_t blocks = ceil_div(n, kBlock);
  const int threads = blocks > 1 ? n_threads : 1;
  const double limit = std::numeric_limits<float>::max();
  std::vector<double> part(static_cast<std::size_t>(blocks * c));
  std::vector<int> bad(static_cast<std::size_t>(blocks), 0);
  // Pass 1: validity (and column sums when fitting), per block.
  parallel_for<true>(0, blocks, threads, [&](index_t b) {
    double* sum = part.data() + b * c;
    std::fill(sum, sum + c, 0.0);
    for (index_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i)
      for (index_t j = 0; j < c; ++j) {
        const double v = static_cast<double>(values[i * c + j]);
        if (!(std::fabs(v) <= limit)) bad[static_cast<std::size_t>(b)] = 1;  // NaN fails the test too
        sum[j] += v;
      }
  });
  for (int x : bad)
    if (x) return 1;
  if (fit) {
    for (index_t j = 0; j < c; ++j) {
      double s = 0.0;
      for (index_t b = 0; b < blocks; ++b) s += part[static_cast<std::size_t>(b * c + j)];
      mean[j] = s / static_cast<double>(n);
    }
    parallel_for<true>(0, blocks, threads, [&](index_t b) {
      double* sq = part.data() + b * c;
      std::fill(sq, sq + c, 0.0);
      for (index_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i)
        for (index_t j = 0; j < c; ++j) {
          const double d = static_cast<double>(values[i * c + j]) - mean[j];
          sq[j] += d * d;
        }
    });
    for (index_t j = 0; j < c; ++j) {
      double s = 0.0;
      for (index_t b = 0; b < blocks; ++b) s += part[static_cast<std::size_t>(b * c + j)];
      const double sd = std::sqrt(s / static_cast<double>(n));
      std[j] = sd > 0.0 ? sd : 1.0;
    }
  }
  // Pass 2 (3 when fitting): the standardised float32 values.
  parallel_for<true>(0, blocks, threads, [&](index_t b) {
    const index_t i = b * kBlock, rows = std::min(kBlock, n - i);
    bool over;
    if constexpr (std::is_same_v<T, float>)
      over = ks.standardize_f32(values + i * c, rows, c, mean, std, out + i * c);
    else
      over = ks.standardize_f64(values + i * c, rows, c, mean, std, out + i * c);
    if (over) bad[static_cast<std::size_t>(b)] = 2;
  });
  for (int x : bad)
    if (x) return 2;
  return 0;
}

template <class T>
int bag_weights(const std::int64_t* indptr, index_t rows, const T* data, bool mean, float* out, int n_threads) {
  constexpr index_t kBlock = 16384;  // rows per parallel chunk (a few entries each)
  const index_t blocks = ceil_div(rows, kBlock);
  const double limit = std::numeric_limits<float>::max();
  std::vector<int> bad(static_cast<std::size_t>(blocks), 0);
  parallel_for<true>(0, blocks, blocks > 1 ? n_threads : 1, [&](index_t b) {
    const index_t r0 = b * kBlock, r1 = std::min(rows, r0 + kBlock);
    int over = 0;
    for (std::int64_t k = indptr[r0]; k < indptr[r1]; ++k) {  // one flat loop: it vectorises
      const double v = static_cast<double>(data[k]);
      over |= !(std::fabs(v) <= limit);  // NaN fails the test too
      out[k] = static_cast<float>(v);
    }
    bad[static_cast<std::size_t>(b)] = over;
    if (!mean) return;
    for (index_t r = r0; r < r1; ++r) {
      double sum = 0.0;
      for (std::int64_t k = indptr[r]; k < indptr[r + 1]; ++k) sum += static_cast<double>(out[k]);
      const float scale = sum != 0.0 ? static_cast<float>(1.0 / sum) : 0.0f;
      for (std::int64_t k = indptr[r]; k < indptr[r + 1]; ++k) out[k] *= scale;
    }
  });
  for (int x : bad)
    if (x) return 1;
  return 0;
}

template int bag_weights<float>(const std::int64_t*, index_t, const float*, bool, float*, int);
template int bag_weights<double>(const std::int64_t*, index_t, const double*, bool, float*, int);

template int standardize<float>(const KernelSet&, const float*, index_t, index_t, bool, double*, double*, float*,
                                int);
template int standardize<double>(const KernelSet&, const double*, index_t, index_t, bool, double*, double*,
                                 float*, int);

}  // namespace fastrec
