// The only place that includes OpenMP. Serial fallbacks when the build has no OpenMP.
#pragma once
#include <cstdint>
#include <exception>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace fastrec {

inline bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// n_threads <= 0 means "all cores".
inline int resolve_threads(int n_threads) { return n_threads > 0 ? n_threads : max_threads(); }

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// While alive, the calling thread flushes subnormal floats to zero (MXCSR FTZ + DAZ). Weights that L2
// decays towards zero otherwise turn subnormal and make every FMA on them ~20x slower (measured: Adam
// training fell from ~500k to ~25k examples/s). Every thread that computes for the core holds one, so the
// arithmetic, and the results, are the same whatever the thread count.
class FlushDenormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// Runs body(i) for i in [begin, end) on n_threads threads with a static schedule (each thread gets one
// contiguous chunk, the same chunks for the same n_threads). Exceptions are captured (the first wins),
// the loop runs to its end, and the exception is rethrown outside the parallel region: none may escape it.
template <class Body>
void parallel_for(std::int64_t begin, std::int64_t end, int n_threads, Body&& body) {
  if (end <= begin) return;
  const int threads = resolve_threads(n_threads);
  if (threads == 1 || end - begin == 1) {
    for (std::int64_t i = begin; i < end; ++i) body(i);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const FlushDenormals flush;  // worker threads do not inherit the caller's MXCSR
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::int64_t i = begin; i < end; ++i) {
      try {
        body(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fastrec
