// Input preparation in the core: work on raw input values before the first batch (issue 17).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastrec {

struct KernelSet;

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

// Initial parameters: out[i] = loc + scale * z_i for i < n, z_i approximately standard normal (the sum of four
// 16-bit uniforms of splitmix64's output for (seed, i), centred and scaled to unit variance: support
// +-3.46, the shape of a truncated normal). A value depends on (seed, i) only: the same numbers for any thread
// count, and a grown table's new rows drawn without redrawing the old ones.
// ks: the kernel set that draws (any ISA gives the same numbers), over 65,536-value chunks in parallel.
void fill_normal(const KernelSet& ks, std::uint64_t seed, index_t first, index_t n, float loc, float scale,
                 float* out, int n_threads);

// Numeric columns standardised for the core: values is n x c (row-major, float32 or float64); when fit, mean
// and std (c each) are computed first (float64 sums in fixed 65,536-row blocks added in order: the same bits
// for any thread count; std is the population deviation, 1 where it is 0); out = float32((v - mean) / std).
// Returns 0, or 1 when a value is not finite or beyond float32's range, 2 when a standardised value is beyond
// float32's range.
template <class T>
int standardize(const KernelSet& ks, const T* values, index_t n, index_t c, bool fit, double* mean, double* std,
                float* out, int n_threads);

// The weights of a bag table from a CSR matrix's values (T: float or double; row r holds entries
// indptr[r]..indptr[r + 1]): out[k] = float32(data[k]), and with mean out[k] *= float32(1 / sum) where sum is the
// float64 sum of the row's float32 weights in order (0 for a row that sums to 0). Rows in parallel, each by one
// thread: the same bits for any thread count. Returns 0, or 1 when a value is not finite or beyond float32's
// range.
template <class T>
int bag_weights(const std::int64_t* indptr, index_t rows, const T* data, bool mean, float* out, int n_threads);

std::uint32_t crc32(const unsigned char* data, std::size_t size);

}  // namespace fastrec
