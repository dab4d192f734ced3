// Backward attention for every bias scheme (with the bias-parameter gradient for learned
// schemes), beside the fused forward of the same shape. 8 heads, d = 64, fp32, batch 1.
// GFLOPS counts 2.5x the forward's useful FLOPs (FlashAttention's convention: five products
// against the forward's two). backward_mqa: one key/value head, batch 1, on 1 and 2 threads (the
// query heads of the one group split over the threads). backward_one_thread: no bias on one
// thread. peak_fraction: GFLOPS over the FMA peak of the threads used (peak.hpp).
#include "peak.hpp"
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>

using namespace relbias;
using namespace relbias_bench;

namespace {

template <class Bias>
void run_backward(benchmark::State& state, index_t length, bool causal, index_t kv_heads, int threads) {
  const masking mask = causal ? masking::causal : masking::bidirectional;
  const auto q = random_input(length, heads, 1), k = random_input(length, kv_heads, 2), v = random_input(length, kv_heads, 3);
  const auto d_out = random_input(length, heads, 4);
  const Bias bias = make_bias<Bias>(mask);
  const attention_options<float> options{.mask = mask, .num_threads = threads};
  const auto forward = attention(q.view(), k.view(), v.view(), bias, options);
  tensor<float> dq(1, length, heads, dim), dk(1, length, kv_heads, dim), dv(1, length, kv_heads, dim);
  std::vector<float> bias_grad;
  if constexpr (learned_bias<Bias>) bias_grad.resize(std::size_t(bias.parameters().size()));
  for (auto _ : state) {
    attention_backward(q.view(), k.view(), v.view(), forward.out.view(), d_out.view(), forward.lse, bias, options,
                       dq.view(), dk.view(), dv.view(), bias_grad);
    benchmark::DoNotOptimize(dq.data());
  }
  set_gflops(state, 2.5 * forward_flops(length, length, causal));
  add_peak_fraction(state, 2.5 * forward_flops(length, length, causal), threads);
}

template <class Bias>
void backward(benchmark::State& state) {
  run_backward<Bias>(state, state.range(0), state.range(1) != 0, heads, 0);
}

/// One thread against the one-thread FMA peak.
void backward_one_thread(benchmark::State& state) {
  run_backward<no_bias<float>>(state, state.range(0), state.range(1) != 0, heads, 1);
}

void backward_mqa(benchmark::State& state) {
  run_backward<no_bias<float>>(state, state.range(0), false, 1, int(state.range(1)));
}

}  // namespace

int main(int argc, char** argv) {
  register_peak_benchmarks();
  for_each_policy([]<class Bias>(const char* name) {
    auto* b = benchmark::RegisterBenchmark((std::string("backward/") + name).c_str(), backward<Bias>);
    for (int causal : {0, 1})
      for (int length : {1024, 4096}) b->Args({length, causal});
    b->ArgNames({"L", "causal"})->Unit(benchmark::kMillisecond)->UseRealTime();
  });
  benchmark::RegisterBenchmark("backward_one_thread/none", backward_one_thread)
      ->Args({4096, 0})
      ->ArgNames({"L", "causal"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::RegisterBenchmark("backward_mqa/none", backward_mqa)
      ->Args({2048, 1})
      ->Args({2048, 2})
      ->ArgNames({"L", "threads"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
