// The bf16 forward on AMX (attention_options::compute = compute_precision::bf16, q, k, v in
// Eigen::bfloat16) beside the fp32 kernel on the same values in float and the 16-bit storage
// path that widens to float (compute_precision::fp32), for no bias, ALiBi and T5, bidirectional
// and causal, 8 heads, d = 64, batch 1, on 1 thread and on all (2 on the 2-vCPU machines).
// GFLOPS counts useful FLOPs: 4 Lq Lk d per head, halved for causal (bench/policies.hpp).
// peak_fraction divides by the fp32 FMA peak of the same threads and amx_fraction by the AMX
// bf16 tile peak (bench/peak.hpp), both measured when the program starts. Without usable AMX
// the bf16 rows run the widening path (the context says so) and have no amx_fraction.
//
//
// Training rows (backward/...): the backward of the same inputs (d_out random, o and lse from the
// forward, the bias gradient for T5), bidirectional, L = 4096, 1 thread: the bf16 backward on AMX
// (bf16 q, k, v, d_out; float o) beside the fp32 backward of the same values in float. GFLOPS
// counts 2.5x the forward's FLOPs (five products against two, as bench/backward.cpp).
//
//   build-bench/bench/bench_bf16 --benchmark_min_time=1 --benchmark_repetitions=3
#include "peak.hpp"
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/attention_half.hpp>

using namespace relbias;
using namespace relbias_bench;

namespace {

enum class path { amx_bf16, widened_bf16, fp32 };

template <class Bias>
void run(benchmark::State& state, path which) {
  const index_t length = state.range(0);
  const bool causal = state.range(1) != 0;
  const int threads = int(state.range(2));
  const masking mask = causal ? masking::causal : masking::bidirectional;
  const auto qf = random_input(length, heads, 1), kf = random_input(length, heads, 2), vf = random_input(length, heads, 3);
  tensor<Eigen::bfloat16> q(1, length, heads, dim), k(1, length, heads, dim), v(1, length, heads, dim);
  convert(qf.view(), q.view());
  convert(kf.view(), k.view());
  convert(vf.view(), v.view());
  tensor<float> o(1, length, heads, dim);
  std::vector<float> lse(std::size_t(heads * length));
  const Bias bias = make_bias<Bias>(mask);
  attention_options<float> options{.mask = mask, .num_threads = threads};
  if (which == path::amx_bf16) options.compute = compute_precision::bf16;
  for (auto _ : state) {
    if (which == path::fp32) attention(qf.view(), kf.view(), vf.view(), bias, options, o.view(), std::span<float>(lse));
    else attention(q.view(), k.view(), v.view(), bias, options, o.view(), std::span<float>(lse));
    benchmark::DoNotOptimize(o.data());
  }
  const double flops = forward_flops(length, length, causal);
  set_gflops(state, flops);
  add_peak_fraction(state, flops, threads);
  add_amx_fraction(state, flops, threads);
}

template <class Bias>
void register_rows(const std::string& name, path which) {
  const char* prefix = which == path::amx_bf16 ? "bf16_amx/" : which == path::widened_bf16 ? "bf16_widened/" : "fp32/";
  auto* b = benchmark::RegisterBenchmark((prefix + name).c_str(), [which](benchmark::State& state) { run<Bias>(state, which); });
  for (const int threads : {1, max_threads()})
    for (int causal : {0, 1}) b->Args({4096, causal, threads});
  b->ArgNames({"L", "causal", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

/// The backward, bf16 on AMX (amx) or fp32, of one bidirectional call of `length` keys on `threads`.
template <class Bias>
void run_backward(benchmark::State& state, bool amx) {
  const index_t length = state.range(0);
  const int threads = int(state.range(1));
  const auto qf = random_input(length, heads, 1), kf = random_input(length, heads, 2), vf = random_input(length, heads, 3);
  const auto d_outf = random_input(length, heads, 4);
  tensor<Eigen::bfloat16> q(1, length, heads, dim), k(1, length, heads, dim), v(1, length, heads, dim), d_out(1, length, heads, dim);
  convert(qf.view(), q.view());
  convert(kf.view(), k.view());
  convert(vf.view(), v.view());
  convert(d_outf.view(), d_out.view());
  const Bias bias = make_bias<Bias>(masking::bidirectional);
  attention_options<float> options{.num_threads = threads};
  if (amx) options.compute = compute_precision::bf16;
  const auto forward =
      amx ? attention(q.view(), k.view(), v.view(), bias, options) : attention(qf.view(), kf.view(), vf.view(), bias, options);
  tensor<float> dq(1, length, heads, dim), dk(1, length, heads, dim), dv(1, length, heads, dim);
  std::vector<float> bias_grad;
  if constexpr (learned_bias<Bias>) bias_grad.resize(std::size_t(bias.parameters().size()));
  for (auto _ : state) {
    if (amx)
      attention_backward(q.view(), k.view(), v.view(), forward.out.view(), d_out.view(), std::span<const float>(forward.lse), bias, options,
                         dq.view(), dk.view(), dv.view(), std::span<float>(bias_grad));
    else
      attention_backward(qf.view(), kf.view(), vf.view(), forward.out.view(), d_outf.view(), forward.lse, bias, options, dq.view(),
                         dk.view(), dv.view(), bias_grad);
    benchmark::DoNotOptimize(dq.data());
  }
  const double flops = 2.5 * forward_flops(length, length, false);
  set_gflops(state, flops);
  add_peak_fraction(state, flops, threads);
  if (amx) add_amx_fraction(state, flops, threads);
}

template <class Bias>
void register_backward_rows(const std::string& name, bool amx) {
  const std::string prefix = amx ? "backward/bf16_amx/" : "backward/fp32/";
  auto* b = benchmark::RegisterBenchmark((prefix + name).c_str(), [amx](benchmark::State& state) { run_backward<Bias>(state, amx); });
  b->Args({4096, 1})->ArgNames({"L", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_peak_benchmarks();
  register_amx_peak_benchmarks();
  benchmark::AddCustomContext("bf16_rows", detail::amx::usable() ? "AMX tile products" : "no usable AMX: the widening path");
  register_rows<no_bias<float>>("none", path::amx_bf16);
  register_rows<alibi<float>>("alibi", path::amx_bf16);
  register_rows<t5<float>>("t5", path::amx_bf16);
  register_rows<no_bias<float>>("none", path::fp32);
  register_rows<alibi<float>>("alibi", path::fp32);
  register_rows<t5<float>>("t5", path::fp32);
  register_rows<no_bias<float>>("none", path::widened_bf16);
  for (const bool amx : {true, false}) {
    register_backward_rows<no_bias<float>>("none", amx);
    register_backward_rows<alibi<float>>("alibi", amx);
    register_backward_rows<t5<float>>("t5", amx);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
