// The machine's read bandwidth, the ceiling for the memory-bound figures of bench_retrieval.py: a parallel
// sum over a caller's float array (the same array the benchmark's top-k reads), each of `threads` threads
// summing one contiguous share with 16 independent accumulators (plain loops the compiler vectorises for
// the baseline ISA; at ~4 floats per cycle per core a core out-sums memory). bench_retrieval.py compiles it
// (c++ -O3 -fopenmp -shared -fPIC) and calls it through ctypes:
//   double read_sum(const float* x, long n, int threads)   // returns the sum (so the reads are not elided)
#include <omp.h>

extern "C" double read_sum(const float* x, long n, int threads) {
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const long begin = n * t / nt, end = n * (t + 1) / nt;
    float acc[16] = {};
    long i = begin;
    for (; i + 16 <= end; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += x[i + l];
    for (; i < end; ++i) acc[0] += x[i];
    for (int l = 0; l < 16; ++l) total += acc[l];
  }
  return total;
}
