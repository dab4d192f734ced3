#pragma once
// The one place that talks to OpenMP. Without OpenMP everything runs on the calling thread.

#include "relbias/offset.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <optional>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace relbias::detail {

/// Flushes subnormal floats to zero on the current thread while it lives, then restores the
/// caller's mode. Distant keys under ALiBi or KERPLE get probabilities near FLT_MIN whose
/// products with V are subnormal, and every subnormal result costs x86 a microcode assist:
/// measured 25% on ALiBi at L = 4096. The values lost are below 1e-38 (float) against row sums
/// of at least 1. Elsewhere (no SSE control register) it does nothing.
class subnormals_flushed {
 public:
#if defined(__SSE__) || defined(_M_X64)
  subnormals_flushed() noexcept : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | flush_to_zero | denormals_are_zero); }
  ~subnormals_flushed() { _mm_setcsr(saved_); }
  subnormals_flushed(const subnormals_flushed&) = delete;
  subnormals_flushed& operator=(const subnormals_flushed&) = delete;

 private:
  static constexpr unsigned flush_to_zero = 0x8000, denormals_are_zero = 0x0040;
  unsigned saved_;
#endif
};

/// The most threads a call starts: four per processor. A request beyond it (num_threads =
/// 100000) would make OpenMP create that many threads, or fail to, for no gain on compute-bound
/// tiles; within it, oversubscription stays the caller's choice.
inline int thread_limit() noexcept {
#ifdef _OPENMP
  return std::max(1, std::min(4 * omp_get_num_procs(), omp_get_thread_limit()));
#else
  return 1;
#endif
}

/// Threads for a call: the requested count, OpenMP's default for 0, clamped to [1, thread_limit()];
/// always 1 without OpenMP.
inline int thread_count(int requested) noexcept {
#ifdef _OPENMP
  return std::clamp(requested > 0 ? requested : omp_get_max_threads(), 1, thread_limit());
#else
  (void)requested;
  return 1;
#endif
}

/// The first exception thrown by any thread of a parallel region, rethrown on the calling thread
/// after the region: an exception must not leave an OpenMP region (that calls std::terminate).
/// Once one is caught, the other threads skip their remaining items.
class first_exception {
 public:
  bool failed() const noexcept { return failed_.load(std::memory_order_relaxed); }

  template <class Work>
  void run(Work&& work) noexcept {
    if (failed()) return;
    try {
      work();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }

  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

inline int this_thread() noexcept {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Runs body(item, scratch) for item in [0, count) on `threads` threads (at most one per item),
/// with subnormals flushed. Each thread builds its scratch once with make_scratch(). Items are
/// handed out one at a time in order (dynamic schedule), so listing the most expensive items first
/// balances uneven (causal) work. An exception from make_scratch or body (a user policy that
/// throws, std::bad_alloc) stops the remaining items and reaches the caller.
template <class MakeScratch, class Body>
void parallel_items(index_t count, int threads, MakeScratch make_scratch, Body body) {
  if (count <= 0) return;
  first_exception error;
#ifdef _OPENMP
  const int team = int(std::clamp<index_t>(threads, 1, count));
#pragma omp parallel num_threads(team)
  {
    // Eigen parallelises a product itself when it finds one thread in the team; our tiles are
    // already the parallel grain. Setting this thread's own ICV keeps Eigen's products serial
    // and does not leak to the caller (ICVs set inside a region are local to its tasks).
    omp_set_num_threads(1);
    const subnormals_flushed flushed;
    std::optional<decltype(make_scratch())> scratch;
    error.run([&] { scratch.emplace(make_scratch()); });
#pragma omp for schedule(dynamic, 1)
    for (index_t item = 0; item < count; ++item)
      if (scratch) error.run([&] { body(item, *scratch); });
  }
#else
  (void)threads;
  const subnormals_flushed flushed;
  std::optional<decltype(make_scratch())> scratch;
  error.run([&] { scratch.emplace(make_scratch()); });
  for (index_t item = 0; item < count && scratch; ++item) error.run([&] { body(item, *scratch); });
#endif
  error.rethrow();
}

}  // namespace relbias::detail
