#pragma once
// The FMA peak probe (fma_peak.hpp) as Google Benchmark rows: benchmarks register
// "peak/fma/threads:N" rows (the report divides by them) and add a "peak_fraction" counter to each
// kernel row, from a probe taken when the program starts.

#include "fma_peak.hpp"

#include <benchmark/benchmark.h>

#include <string>

namespace relbias_bench {

inline void fma_peak_benchmark(benchmark::State& state) {
  const int threads = int(state.range(0));
  double flops = 0;
  for (auto _ : state) flops += fma_rounds_on(threads, rounds_per_region);
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsRate);
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
