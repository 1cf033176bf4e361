// The only place that includes OpenMP. Serial fallbacks when the build has no OpenMP.
#pragma once
#include <algorithm>
#include <chrono>
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

// The thread count of each training batch when the caller asked for "all cores" (n_threads <= 0), chosen
// by measurement. When other processes keep the cores busy, every parallel region waits for whichever of
// its threads the OS has paused: an epoch that took 1 s on one thread took 6 s on two
// (benchmarks/bench_contention.py). Results do not depend on the thread count, so the loop may switch
// freely: at the start of each period it runs kProbe batches on one thread and kProbe on all, then uses
// whichever was faster per row. A choice that a probe confirms is checked half as often next time (up to
// every kMaxPeriod batches), since probing the slow setting is what the measurement costs.
class BatchThreads {
 public:
  explicit BatchThreads(int n_threads)
      : all_(resolve_threads(n_threads)), measure_(n_threads <= 0 && all_ > 1), chosen_(all_) {}

  int next() {  // the thread count of the next batch (then call done)
    start_ = std::chrono::steady_clock::now();
    if (!measure_) return all_;
    const std::int64_t phase = batch_ - period_start_;
    return phase < kProbe ? 1 : phase < 2 * kProbe ? all_ : chosen_;
  }

  void done(std::int64_t rows) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const std::int64_t phase = batch_++ - period_start_;
    if (!measure_) return;
    if (phase < 2 * kProbe) (phase < kProbe ? one_ : all_time_) += seconds / static_cast<double>(rows > 0 ? rows : 1);
    if (phase == 2 * kProbe - 1) {
      const int pick = one_ < all_time_ ? 1 : all_;
      period_ = pick == chosen_ ? std::min(2 * period_, kMaxPeriod) : kPeriod;
      chosen_ = pick;
      one_ = all_time_ = 0.0;
    }
    if (phase + 1 >= period_) period_start_ = batch_;
  }

 private:
  static constexpr std::int64_t kPeriod = 64, kMaxPeriod = 1024, kProbe = 2;
  const int all_;
  const bool measure_;
  int chosen_;
  std::int64_t batch_ = 0, period_start_ = 0, period_ = kPeriod;
  double one_ = 0.0, all_time_ = 0.0;  // seconds per row summed over this period's probes
  std::chrono::steady_clock::time_point start_;
};

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
// contiguous chunk, the same chunks for the same n_threads), or with kDynamic one i at a time to whichever
// thread is free (for independent units of work whose results do not depend on the thread: a thread slowed
// by another process then does fewer). Exceptions are captured (the first wins), the loop runs to its end,
// and the exception is rethrown outside the parallel region: none may escape it.
template <bool kDynamic = false, class Body>
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
    auto run = [&](std::int64_t i) {
      try {
        body(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    };
    if constexpr (kDynamic) {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (std::int64_t i = begin; i < end; ++i) run(i);
    } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (std::int64_t i = begin; i < end; ++i) run(i);
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fastrec
