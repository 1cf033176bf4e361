// The only place that includes OpenMP. Serial fallbacks when the build has no OpenMP.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <limits>
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

// The thread count of each batch of a loop whose caller asked for "all cores" (n_threads <= 0), chosen by
// measurement. When other processes keep the cores busy, every parallel region waits for whichever of its
// threads the OS has paused: with one other process spinning on one of two cores, batch-1024 training on two
// threads fell to a fifth of one thread's speed (benchmarks/bench_contention.py). Results do not depend on the
// thread count, so the loop may switch freely. A probe alternates batches on one thread and on all until each
// setting has kProbe, or until one setting is kClear times slower per row than the other after one of each;
// the loop then uses the faster. The next probe comes kPeriod batches later, or twice the last period (up to
// kMaxPeriod) when it confirms the choice, since running the slow setting is what probing costs; and at once
// when a batch of the chosen setting is slower per row than the rejected setting was (a slowdown). The batch
// that ends a period, or shows the slowdown, counts as the probe's first. The first batch (first touches of
// memory, caches built on a first call) runs on all threads, unmeasured. Not thread-safe (SharedThreadChoice is).
class ThreadChoice {
 public:
  explicit ThreadChoice(int n_threads) : ThreadChoice(resolve_threads(n_threads), n_threads <= 0) {}
  ThreadChoice(int all, bool automatic) : all_(all), measure_(automatic && all > 1), chosen_(all) {}

  int all() const { return all_; }
  int chosen() const { return chosen_; }
  void probe() { probing_ = true; }  // probe from the next batch on
  // Start on `threads` as if a probe had just chosen it (no warm-up batch, no probe until kPeriod batches), with
  // nothing known of the other setting: only the period's end probes again.
  void resume(int threads) {
    if (!measure_) return;
    warm_up_ = probing_ = false;
    chosen_ = threads == 1 ? 1 : all_;
    rejected_ = std::numeric_limits<double>::infinity();
    period_ = kPeriod;
  }
  std::int64_t decisions() const { return decisions_; }

  int next() const {  // the thread count of the next batch
    if (!measure_ || warm_up_) return all_;
    if (probing_) return probes_[0] <= probes_[1] ? 1 : all_;
    return chosen_;
  }

  // A batch of rows ran on `threads` threads in `seconds`.
  void done(int threads, double seconds, std::int64_t rows) {
    if (!measure_) return;
    if (warm_up_) {
      warm_up_ = false;
      return;
    }
    const double per_row = seconds / static_cast<double>(rows > 0 ? rows : 1);
    ++batch_;
    if (!probing_) {
      if (threads != chosen_) return;  // (a concurrent caller of a shared choice)
      // A slowdown is a second batch slower than the rejected setting was within kSlowGap batches: a lone
      // outlier (an interrupt, a VM exit) as the probe's first sample, against one normal batch of the other
      // setting, would decide a whole period on the slower setting, while a busy core slows every few batches.
      if (batch_ - decided_ < period_) {
        if (per_row <= rejected_) return;
        const bool again = batch_ - last_slow_ <= kSlowGap;
        last_slow_ = batch_;
        if (!again) return;
      }
      probing_ = true;  // a slowdown or the period's end: this batch is the probe's first
    }
    const int k = threads == 1 ? 0 : 1;
    probe_[k] += per_row;
    ++probes_[k];
    if (probes_[0] == 0 || probes_[1] == 0) return;
    const double one = probe_[0] / probes_[0], all = probe_[1] / probes_[1];
    if ((probes_[0] >= kProbe && probes_[1] >= kProbe) || std::max(one, all) > kClear * std::min(one, all)) {
      const int pick = one < all ? 1 : all_;
      period_ = pick == chosen_ ? std::min(2 * period_, kMaxPeriod) : kPeriod;
      chosen_ = pick;
      rejected_ = pick == 1 ? all : one;
      probing_ = false;
      decided_ = batch_;
      ++decisions_;
      probe_[0] = probe_[1] = 0.0;
      probes_[0] = probes_[1] = 0;
    }
  }

 private:
  static constexpr std::int64_t kPeriod = 64, kMaxPeriod = 1024;
  static constexpr int kProbe = 2;
  static constexpr double kClear = 1.5;
  static constexpr std::int64_t kSlowGap = 8;

  int all_;
  bool measure_;
  int chosen_;
  bool warm_up_ = true, probing_ = true;
  std::int64_t batch_ = 0, decided_ = 0, period_ = kPeriod;  // batches measured; batch_ at the last choice
  double probe_[2] = {0.0, 0.0};  // seconds per row summed over this probe's batches on 1 / on all threads
  int probes_[2] = {0, 0};
  double rejected_ = 0.0;  // seconds per row of the setting the last probe rejected (0: none yet)
  std::int64_t last_slow_ = -kSlowGap - 1;  // batch_ of the last batch slower per row than rejected_
  std::int64_t decisions_ = 0;
};

// The last choice a training loop of this process made, and when (steady_clock ns): each epoch call builds a
// new BatchThreads, and on a busy machine the warm-up batch and the probe's batch on all threads cost 15x a
// one-thread batch (measured: 31 ms against 2 ms with a process spinning on the other core), every epoch.
struct TrainingChoice {
  std::atomic<int> threads{0};  // 0: none yet
  std::atomic<std::int64_t> at{0};

  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void record(int chosen) {
    threads.store(chosen, std::memory_order_relaxed);
    at.store(now_ns(), std::memory_order_relaxed);
  }
  double age_seconds() const { return static_cast<double>(now_ns() - at.load(std::memory_order_relaxed)) * 1e-9; }
};
inline TrainingChoice& last_training_choice() {
  static TrainingChoice choice;
  return choice;
}

// ThreadChoice timing a loop's batches: `threads = bt.next(); ...batch...; bt.done(rows);`. A loop starts on one
// thread, without the warm-up and probe on all, when the last training loop chose one thread at most
// kPriorSeconds ago (a machine busy then likely is still; the period's end probes again).
class BatchThreads {
 public:
  explicit BatchThreads(int n_threads) : choice_(n_threads) {
    const TrainingChoice& last = last_training_choice();
    if (last.threads.load(std::memory_order_relaxed) == 1 && last.age_seconds() <= kPriorSeconds) choice_.resume(1);
    decisions_ = choice_.decisions();
  }

  int next() {
    threads_ = choice_.next();
    start_ = std::chrono::steady_clock::now();
    return threads_;
  }

  void done(std::int64_t rows) {
    choice_.done(threads_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(), rows);
    if (choice_.decisions() != decisions_) {
      decisions_ = choice_.decisions();
      last_training_choice().record(choice_.chosen());
    }
  }

 private:
  static constexpr double kPriorSeconds = 10.0;
  ThreadChoice choice_;
  std::int64_t decisions_ = 0;
  int threads_ = 1;
  std::chrono::steady_clock::time_point start_;
};

// One ThreadChoice per kind of serving call (predict, top-k), shared by every call of that kind in the
// process: there each call (or each chunk of a long one) is a batch. Calls may come from several Python
// threads at once; each reports the thread count it ran on.
class SharedThreadChoice {
 public:
  SharedThreadChoice() : choice_(0) {}

  // While alive: the thread count of one batch of `rows` rows (n_threads as the caller asked: a fixed count
  // is used as it is; a batch under min_rows gets the current choice and is not measured).
  class Batch {
   public:
    Batch(SharedThreadChoice& shared, int n_threads, std::int64_t rows, std::int64_t min_rows)
        : shared_(shared), rows_(rows), threads_(resolve_threads(n_threads)),
          measured_(n_threads <= 0 && threads_ > 1 && rows >= min_rows) {
      if (n_threads > 0 || threads_ == 1) return;
      {
        const std::lock_guard<std::mutex> lock(shared_.mutex_);
        // "All" may have changed since the last call (threadpoolctl sets OpenMP's thread count): start over.
        if (shared_.choice_.all() != threads_) shared_.choice_ = ThreadChoice(0);
        // A small batch follows the current choice and is not measured (its time is mostly overhead).
        // Serving calls can be long and few: probe again after kMaxSeconds as well (a machine that became
        // quiet does not slow the one-thread setting down, so nothing else would notice it soon).
        const auto now = std::chrono::steady_clock::now();
        if (shared_.choice_.decisions() != shared_.decisions_) {
          shared_.decisions_ = shared_.choice_.decisions();
          shared_.decided_at_ = now;
        } else if (measured_ && now - shared_.decided_at_ > std::chrono::duration<double>(kMaxSeconds)) {
          shared_.choice_.probe();
          shared_.decided_at_ = now;
        }
        threads_ = measured_ ? shared_.choice_.next() : shared_.choice_.chosen();
      }
      start_ = std::chrono::steady_clock::now();
    }
    ~Batch() {
      if (!measured_) return;
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      const std::lock_guard<std::mutex> lock(shared_.mutex_);
      shared_.choice_.done(threads_, seconds, rows_);
    }
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;
    int threads() const { return threads_; }

   private:
    SharedThreadChoice& shared_;
    const std::int64_t rows_;
    int threads_;
    const bool measured_;
    std::chrono::steady_clock::time_point start_;
  };

 private:
  static constexpr double kMaxSeconds = 0.5;
  std::mutex mutex_;
  ThreadChoice choice_;
  std::int64_t decisions_ = 0;
  std::chrono::steady_clock::time_point decided_at_;
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
