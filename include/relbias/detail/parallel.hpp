#pragma once
// The one place that talks to OpenMP. Without OpenMP everything runs on the calling thread.

#include "relbias/offset.hpp"

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

/// Threads for a call: the requested count, OpenMP's default for 0, always 1 without OpenMP.
inline int thread_count(int requested) noexcept {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

inline int this_thread() noexcept {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Runs body(item, scratch) for item in [0, count) on `threads` threads, with subnormals flushed.
/// Each thread builds its scratch once with make_scratch(). Items are handed out one at a time in order (dynamic
/// schedule), so listing the most expensive items first balances uneven (causal) work.
template <class MakeScratch, class Body>
void parallel_items(index_t count, int threads, MakeScratch make_scratch, Body body) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    // Eigen parallelises a product itself when it finds one thread in the team; our tiles are
    // already the parallel grain. Setting this thread's own ICV keeps Eigen's products serial
    // and does not leak to the caller (ICVs set inside a region are local to its tasks).
    omp_set_num_threads(1);
    const subnormals_flushed flushed;
    auto scratch = make_scratch();
#pragma omp for schedule(dynamic, 1)
    for (index_t item = 0; item < count; ++item) body(item, scratch);
  }
#else
  (void)threads;
  const subnormals_flushed flushed;
  auto scratch = make_scratch();
  for (index_t item = 0; item < count; ++item) body(item, scratch);
#endif
}

}  // namespace relbias::detail
