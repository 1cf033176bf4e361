// Input preparation in the core: work on raw input values before the first batch (issue 17).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastrec {

// Bucket 1..buckets of each value: CRC-32 (zlib's: reflected 0xEDB88320, init and final xor 0xFFFFFFFF) of
// the value's decimal text (int64 values) modulo buckets, plus 1. The same codes as Python's
// zlib.crc32(str(v).encode()) % buckets + 1, on every platform and run (fastrec's documented hash).
void hash_int64(const std::int64_t* values, index_t n, std::int64_t buckets, std::int32_t* out, int n_threads);

// The same for fixed-width UCS-4 strings (NumPy's "<U{width}"): each value is its code points up to the last
// non-zero one (NumPy drops trailing NULs), encoded as UTF-8 (lone surrogates as their 3-byte form).
void hash_ucs4(const std::uint32_t* values, index_t n, index_t width, std::int64_t buckets, std::int32_t* out,
               int n_threads);

// The distinct values of values[0..n) in increasing order, and the 1-based position among them of each value
// (codes[i] = rank of values[i] + 1): NumPy's unique(return_inverse=True) plus one, by an LSD radix sort of
// (value, position) pairs (16-bit digits; digits that every value shares are skipped).
void unique_int64(const std::int64_t* values, index_t n, std::vector<std::int64_t>& unique, std::int32_t* codes);

std::uint32_t crc32(const unsigned char* data, std::size_t size);

}  // namespace fastrec
