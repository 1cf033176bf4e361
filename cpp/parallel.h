// The only place that includes OpenMP. Serial fallbacks when the build has no OpenMP.
#pragma once
#include <cstdint>
#include <exception>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>
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

// True in a process forked after the first call (the bindings make it at import). GNU libgomp hangs in a
// forked child whose parent ran a parallel region (the child has none of the parent's pool threads), so
// such a child runs every loop of the core serially; results are the same, as for any thread count.
inline bool in_forked_child() {
#ifdef _OPENMP
  static bool forked = false;
  // Registered before this process can run any parallel region: every region's size comes from here.
  static const bool registered = [] { return pthread_atfork(nullptr, nullptr, [] { forked = true; }) == 0; }();
  (void)registered;
  return forked;
#else
  return false;
#endif
}

// The number of threads a loop runs on: n_threads, where n_threads <= 0 means "all cores"; always 1 in
// a forked child (see in_forked_child).
inline int resolve_threads(int n_threads) {
  if (in_forked_child()) return 1;
  return n_threads > 0 ? n_threads : max_threads();
}

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

// While alive, subnormals are kept (FTZ/DAZ cleared): for Python code called back from inside the core.
class KeepDenormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  KeepDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~0x8040u); }
  ~KeepDenormals() { _mm_setcsr(saved_); }

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
