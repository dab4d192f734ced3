#pragma once
// The machine's limits, measured in the same run as the kernels so that every GFLOP/s figure can
// be read as a fraction of what this machine, at this moment, can do:
//   - FMA peak: a loop of independent fp32 FMAs on the widest packet Eigen vectorises with
//     (AVX-512: 16 lanes), one thread and all threads. 2 FMA pipes x 4-cycle latency need 8
//     independent chains in flight; 12 leave slack and still fit in the 16 (AVX2) or 32
//     (AVX-512) vector registers.
//   - topology: logical CPUs, physical cores, SMT siblings per core (Linux sysfs), because two
//     vCPUs that are SMT siblings share one core's FMA units (then all threads = one thread).
// No Google Benchmark here, so the quality benchmark (bench_quality) takes the same probe;
// peak.hpp registers it as benchmark rows.

#include <relbias/detail/eigen.hpp>

#include <chrono>
#include <ctime>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace relbias_bench {

/// A global the probe's result is stored to: another translation unit could read it, so the
/// compiler keeps the FMAs (what benchmark::DoNotOptimize does, without Google Benchmark).
inline float fma_sink = 0;

/// Runs `rounds` rounds of 12 independent packet FMAs; returns the FLOPs done.
inline double fma_rounds(long rounds) {
  namespace ei = Eigen::internal;
  using packet = ei::packet_traits<float>::type;
  constexpr int chains = 12, lanes = ei::packet_traits<float>::size;
  const packet a = ei::pset1<packet>(0.999999f), b = ei::pset1<packet>(1e-6f);
  packet acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = ei::pset1<packet>(float(c));
  // Independent chains: no FMA waits on another. No memory clobber in the loop (it would spill
  // the accumulators); the reduction below keeps the FMAs alive (floats are not reassociated).
  for (long n = 0; n < rounds; ++n)
    for (int c = 0; c < chains; ++c) acc[c] = ei::pmadd(acc[c], a, b);
  float sum = 0;
  for (int c = 0; c < chains; ++c) sum += ei::predux(acc[c]);
  fma_sink = sum;
  return 2.0 * chains * lanes * double(rounds);
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// FLOPs done by `threads` threads running fma_rounds(rounds) each.
inline double fma_rounds_on(int threads, long rounds) {
  double flops = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : flops)
  flops += fma_rounds(rounds);
#else
  (void)threads;
  flops = fma_rounds(rounds);
#endif
  return flops;
}

/// Rounds per thread and per parallel region: about 40 ms, as long as a kernel call, so that the
/// all-threads figure pays what a kernel pays when the machine is shared (a region waits for its
/// slowest thread; regions of a millisecond measure the scheduler, not the FMA units).
inline constexpr long rounds_per_region = 20'000'000;

/// The best GFLOP/s of three regions, each of `threads` threads running rounds_per_region
/// rounds, timed by seconds_now() (a clock read in seconds).
template <class Clock>
double best_of_three_regions(int threads, Clock seconds_now) {
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    const double start = seconds_now();
    const double flops = fma_rounds_on(threads, rounds_per_region);
    const double seconds = seconds_now() - start;
    if (seconds > 0) best = std::max(best, flops / seconds / 1e9);
  }
  return best;
}

/// GFLOP/s of `threads` threads (the best of three regions, wall time).
inline double probe_fma_gflops(int threads) {
  return best_of_three_regions(threads, [] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  });
}

/// One-thread GFLOP/s per second of the process's CPU time (the best of three regions): what the
/// core gives while this program runs on it, however busy the machine. The quality benchmark's
/// step rate is per CPU second too (std::clock), so their ratio holds under load, where a
/// wall-clock probe that was descheduled reads low (20-240 GFLOP/s in one shared run) and the
/// ratio high. One thread only: std::clock counts every thread of the process.
inline double probe_fma_gflops_cpu_time() {
  return best_of_three_regions(1, [] { return double(std::clock()) / CLOCKS_PER_SEC; });
}

/// "2 logical CPUs, 2 cores, 1 SMT sibling per core" from /sys/devices/system/cpu (Linux);
/// "unknown" elsewhere.
inline std::string topology() {
  std::set<std::pair<std::string, std::string>> cores;  // (package, core id)
  int logical = 0;
  for (;; ++logical) {
    const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(logical) + "/topology/";
    std::ifstream core(dir + "core_id"), package(dir + "physical_package_id");
    std::string core_id, package_id;
    if (!(core >> core_id) || !(package >> package_id)) break;
    cores.emplace(package_id, core_id);
  }
  if (logical == 0) return "unknown";
  return std::to_string(logical) + " logical CPUs, " + std::to_string(cores.size()) + " cores, " +
         std::to_string(logical / int(cores.size())) + " SMT sibling(s) per core";
}

/// The probe taken when the program starts: one-thread and all-threads FMA peak.
struct machine_peak {
  int threads = max_threads();
  double one_thread = probe_fma_gflops(1);
  double all_threads = probe_fma_gflops(threads);

  /// Peak for a kernel run on `n` threads (0: OpenMP's default, all threads).
  double for_threads(int n) const { return n == 1 ? one_thread : all_threads; }
};

inline const machine_peak& peak() {
  static const machine_peak probe;
  return probe;
}

}  // namespace relbias_bench
