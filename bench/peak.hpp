#pragma once
// The FMA peak probe (fma_peak.hpp) as Google Benchmark rows: benchmarks register
// "peak/fma/threads:N" rows (the report divides by them) and add a "peak_fraction" counter to each
// kernel row, from a probe taken when the program starts. On a CPU with AMX the same holds for
// the bf16 tile units: "peak/amx_bf16/threads:N" rows and an "amx_fraction" counter.

#include "fma_peak.hpp"

#include <relbias/detail/amx.hpp>

#include <benchmark/benchmark.h>

#include <string>

namespace relbias_bench {

inline void fma_peak_benchmark(benchmark::State& state) {
  const int threads = int(state.range(0));
  double flops = 0;
  for (auto _ : state) flops += fma_rounds_on(threads, rounds_per_region);
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
}

/// FLOPs of `threads` threads each running `rounds` rounds of independent AMX tile products
/// (relbias::detail::amx::tile_product_rounds); 0 where AMX is not usable.
inline double amx_rounds_on(int threads, long rounds) {
  if (!relbias::detail::amx::usable()) return 0;
  double flops = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : flops)
#else
  (void)threads;
#endif
  {
    relbias::detail::amx::configure();
    flops += relbias::detail::amx::tile_product_rounds(rounds);
    relbias::detail::amx::release();
  }
  return flops;
}

/// Rounds of 4 tile products (64 cycles at one tdpbf16ps per 16 cycles): about 40 ms per region, as the FMA probe.
inline constexpr long amx_rounds_per_region = 2'000'000;

/// The AMX bf16 peak of one thread and of all, the best of three regions (0 without AMX).
struct amx_peak_probe {
  static double probe(int threads) {
    double best = 0;
    for (int trial = 0; trial < 3; ++trial) {
      const auto start = std::chrono::steady_clock::now();
      const double flops = amx_rounds_on(threads, amx_rounds_per_region);
      best = std::max(best, flops / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 1e9);
    }
    return best;
  }
  double one_thread = probe(1);
  double all_threads = probe(max_threads());
  double for_threads(int n) const { return n == 1 ? one_thread : all_threads; }
};

inline const amx_peak_probe& amx_peak() {
  static const amx_peak_probe probe;
  return probe;
}

inline void amx_peak_benchmark(benchmark::State& state) {
  const int threads = int(state.range(0));
  double flops = 0;
  for (auto _ : state) flops += amx_rounds_on(threads, amx_rounds_per_region);
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
}

/// Where AMX is usable: registers peak/amx_bf16/threads:{1, all} and puts the start-up probe in
/// the run's context; elsewhere says so in the context.
inline void register_amx_peak_benchmarks() {
  if (!relbias::detail::amx::usable()) {
    benchmark::AddCustomContext("amx_bf16_peak", "AMX not usable here (no AMX-BF16, no kernel permission, or RELBIAS_NO_AMX)");
    return;
  }
  const amx_peak_probe& p = amx_peak();
  benchmark::AddCustomContext("amx_bf16_peak_gflops_1_thread", std::to_string(p.one_thread));
  benchmark::AddCustomContext("amx_bf16_peak_gflops_" + std::to_string(max_threads()) + "_threads", std::to_string(p.all_threads));
  auto* b = benchmark::RegisterBenchmark("peak/amx_bf16", amx_peak_benchmark)->Arg(1);
  if (max_threads() > 1) b->Arg(max_threads());
  b->ArgNames({"threads"})->UseRealTime();
}

/// amx_fraction: the kernel's useful GFLOP/s over the AMX bf16 peak of its threads (0: all);
/// nothing where AMX is not usable.
inline void add_amx_fraction(benchmark::State& state, double flops, int threads = 0) {
  if (relbias::detail::amx::usable())
    state.counters["amx_fraction"] =
        benchmark::Counter(flops / 1e9 / amx_peak().for_threads(threads), benchmark::Counter::kIsIterationInvariantRate);
}

/// Registers peak/fma/threads:{1, all} and puts the start-up probe and the topology in the
/// run's context (the JSON's "context" block and the console header).
inline void register_peak_benchmarks() {
  const machine_peak& p = peak();
  benchmark::AddCustomContext("topology", topology());
  benchmark::AddCustomContext("fma_peak_gflops_1_thread", std::to_string(p.one_thread));
  benchmark::AddCustomContext("fma_peak_gflops_" + std::to_string(p.threads) + "_threads", std::to_string(p.all_threads));
  auto* b = benchmark::RegisterBenchmark("peak/fma", fma_peak_benchmark)->Arg(1);
  if (p.threads > 1) b->Arg(p.threads);
  b->ArgNames({"threads"})->UseRealTime();
}

/// peak_fraction: the kernel's useful GFLOP/s over the FMA peak of the threads it ran on
/// (threads = 0: all), beside the GFLOPS counter of set_gflops().
inline void add_peak_fraction(benchmark::State& state, double flops, int threads = 0) {
  state.counters["peak_fraction"] =
      benchmark::Counter(flops / 1e9 / peak().for_threads(threads), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace relbias_bench
