// Forward attention for every bias scheme, the fused kernel beside the materialising reference
// (reference/none), over a sequence-length sweep, causal and bidirectional.
// 8 heads, d = 64, fp32, batch 1. GFLOPS counts useful FLOPs: 4 Lq Lk d per head, halved for
// causal (the reference computes the masked half too, and is charged the same useful count).
// peak_fraction divides it by the FMA peak measured when the program starts (peak.hpp), of all
// threads, or of one thread for forward_one_thread (L = 4096, bidirectional, num_threads = 1).
#include "peak.hpp"
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_reference.hpp>

using namespace relbias;
using namespace relbias_bench;

namespace {

template <class Bias, bool Reference>
void run_forward(benchmark::State& state, index_t length, bool causal, int threads) {
  const masking mask = causal ? masking::causal : masking::bidirectional;
  const auto q = random_input(length, heads, 1), k = random_input(length, heads, 2), v = random_input(length, heads, 3);
  tensor<float> o(1, length, heads, dim);
  std::vector<float> lse(std::size_t(heads * length));
  const Bias bias = make_bias<Bias>(mask);
  const attention_options<float> options{.mask = mask, .num_threads = threads};
  for (auto _ : state) {
    if constexpr (Reference) reference_attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);
    else attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);
    benchmark::DoNotOptimize(o.data());
  }
  set_gflops(state, forward_flops(length, length, causal));
  add_peak_fraction(state, forward_flops(length, length, causal), threads);
}

template <class Bias, bool Reference>
void forward(benchmark::State& state) {
  run_forward<Bias, Reference>(state, state.range(0), state.range(1) != 0, 0);
}

/// One thread against the one-thread FMA peak (the kernel's fraction of the machine without the
/// scheduler's share of a loaded machine in it).
template <class Bias>
void forward_one_thread(benchmark::State& state) {
  run_forward<Bias, false>(state, state.range(0), state.range(1) != 0, 1);
}

void sweep(benchmark::internal::Benchmark* b, int max_length) {
  for (int causal : {0, 1})
    for (int length = 256; length <= max_length; length *= 2) b->Args({length, causal});
  // No MinTime here: scripts/bench.sh passes --benchmark_min_time (0.2 s full, less when quick).
  b->ArgNames({"L", "causal"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_peak_benchmarks();
  for_each_policy([]<class Bias>(const char* name) {
    sweep(benchmark::RegisterBenchmark((std::string("forward/") + name).c_str(), forward<Bias, false>), 16384);
    benchmark::RegisterBenchmark((std::string("forward_one_thread/") + name).c_str(), forward_one_thread<Bias>)
        ->Args({4096, 0})
        ->ArgNames({"L", "causal"})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  });
  sweep(benchmark::RegisterBenchmark("forward/reference/none", forward<no_bias<float>, true>), 16384);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
