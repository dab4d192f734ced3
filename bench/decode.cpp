// One decoding step (Lq = 1) against a KV cache of Lk keys, for every bias scheme.
// The step is bound by streaming K and V: GB/s counts 2 * Lk * heads * d * 4 bytes per step.
#include "policies.hpp"

#include <relbias/attention.hpp>

using namespace relbias;
using namespace relbias_bench;

namespace {

template <class Bias>
void decode(benchmark::State& state) {
  const index_t keys = state.range(0);
  const auto q = random_input(1, heads, 1), k = random_input(keys, heads, 2), v = random_input(keys, heads, 3);
  tensor<float> o(1, 1, heads, dim);
  const Bias bias = make_bias<Bias>(masking::causal);
  const attention_options<float> options{.mask = masking::causal, .q_start = kv_cache_q_start(1, keys)};
  for (auto _ : state) {
    attention(q.view(), k.view(), v.view(), bias, options, o.view());
    benchmark::DoNotOptimize(o.data());
  }
  const double bytes = 2.0 * double(keys) * heads * dim * sizeof(float);
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  for_each_policy([]<class Bias>(const char* name) {
    benchmark::RegisterBenchmark((std::string("decode/") + name).c_str(), decode<Bias>)
        ->ArgName("Lk")->RangeMultiplier(4)->Range(2048, 32768)->Unit(benchmark::kMicrosecond)->UseRealTime();
  });
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
