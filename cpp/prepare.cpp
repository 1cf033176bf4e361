#include "prepare.h"

#include <array>
#include <charconv>

#include "parallel.h"

namespace fastrec {

namespace {

const std::array<std::uint32_t, 256>& crc_table() {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1U) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

std::int32_t bucket(std::uint32_t crc, std::int64_t buckets) {
  return static_cast<std::int32_t>(static_cast<std::int64_t>(crc) % buckets + 1);
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
  const auto& t = crc_table();
  std::uint32_t c = 0xFFFFFFFFU;
  for (std::size_t i = 0; i < size; ++i) c = t[(c ^ data[i]) & 0xFFU] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

void hash_int64(const std::int64_t* values, index_t n, std::int64_t buckets, std::int32_t* out, int n_threads) {
  require(buckets >= 1 && buckets < (std::int64_t{1} << 31) - 1, "hash buckets must be in [1, 2**31 - 2]");
  const index_t chunks = (n + kGrain - 1) / kGrain;
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
  const index_t chunks = (n + kGrain - 1) / kGrain;
  parallel_for(0, chunks, chunks > 1 ? n_threads : 1, [&](index_t c) {
    const auto& t = crc_table();
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

}  // namespace fastrec
