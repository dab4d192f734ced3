// Real batches (sequences.hpp): what skipping tiles buys. 8 heads, d = 64, fp32, causal.
//  window/<policy>          sliding window of 256 keys over L = 4096, 8192, 16384, forward (and
//                           backward for none and alibi): cost should grow as L x window,
//                           i.e. 4x from 4096 to 16384, not 16x
//  padded/alibi             4 sequences in a [4, 2048] batch: unpadded (all 2048 rows) against
//                           lengths 256, 768, 1280, 1792 (half the rows, right padding)
//  packed/alibi             16 sequences of 256: one packed call (cu_seqlens), 16 separate calls,
//                           and one dense causal call over all 4096 tokens as a single sequence
// GFLOPS counts useful FLOPs: 4 d per visible (query, key) pair and head (2.5x that for the
// backward). Compare times as ratios within one run.
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/sequences.hpp>

#include <algorithm>
#include <vector>

using namespace relbias;
using namespace relbias_bench;

namespace {

constexpr index_t window = 256;

/// Visible (query, key) pairs of causal attention over `length` positions, keys at distance < w.
double causal_pairs(index_t length, index_t w) {
  const double l = double(length), n = double(std::min(length, w));
  return l * n - n * (n - 1) / 2;
}

void set_useful_gflops(benchmark::State& state, double pairs, double passes = 1) {
  set_gflops(state, passes * 4.0 * double(dim) * double(heads) * pairs);
}

/// [batch, seq, heads, dim] of uniform values in [-1, 1).
tensor<float> random_batch(index_t batch, index_t seq, std::uint64_t seed) {
  tensor<float> t(batch, seq, heads, dim);
  detail::random_stream rng(seed);
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = float(rng.uniform(-1, 1));
  return t;
}

template <class Bias>
void window_forward(benchmark::State& state) {
  const index_t length = state.range(0);
  const auto q = random_input(length, heads, 1), k = random_input(length, heads, 2), v = random_input(length, heads, 3);
  tensor<float> o(1, length, heads, dim);
  std::vector<float> lse(std::size_t(heads * length));
  const Bias bias = make_bias<Bias>(masking::causal);
  const attention_options<float> options{.mask = masking::causal, .sliding_window = window};
  for (auto _ : state) {
    attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);
    benchmark::DoNotOptimize(o.data());
  }
  set_useful_gflops(state, causal_pairs(length, window));
}

template <class Bias>
void window_backward(benchmark::State& state) {
  const index_t length = state.range(0);
  const auto q = random_input(length, heads, 1), k = random_input(length, heads, 2), v = random_input(length, heads, 3);
  const auto d_out = random_input(length, heads, 4);
  const Bias bias = make_bias<Bias>(masking::causal);
  const attention_options<float> options{.mask = masking::causal, .sliding_window = window};
  const auto forward = attention(q.view(), k.view(), v.view(), bias, options);
  tensor<float> dq(1, length, heads, dim), dk(1, length, heads, dim), dv(1, length, heads, dim);
  for (auto _ : state) {
    attention_backward(q.view(), k.view(), v.view(), forward.out.view(), d_out.view(), forward.lse, bias, options, dq.view(),
                       dk.view(), dv.view());
    benchmark::DoNotOptimize(dq.data());
  }
  set_useful_gflops(state, causal_pairs(length, window), 2.5);
}

/// range(0) = 1: the padded batch (lengths 256 .. 1792, half the rows); 0: every row used.
void padded(benchmark::State& state) {
  const index_t batch = 4, length = 2048;
  const auto q = random_batch(batch, length, 1), k = random_batch(batch, length, 2), v = random_batch(batch, length, 3);
  tensor<float> o(batch, length, heads, dim);
  std::vector<float> lse(std::size_t(batch * heads * length));
  const std::vector<index_t> lengths{256, 768, 1280, 1792};
  const std::vector<sequence> sequences = padded_sequences(lengths, length);
  const alibi<float> bias{heads};
  attention_options<float> options{.mask = masking::causal};
  if (state.range(0) == 1) options.sequences = sequences;
  for (auto _ : state) {
    attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);
    benchmark::DoNotOptimize(o.data());
  }
  double pairs = 0;
  for (index_t n : lengths) pairs += causal_pairs(state.range(0) == 1 ? n : length, length);
  set_useful_gflops(state, pairs);
}

/// range(0): 0 one packed call over 16 x 256, 1 sixteen separate calls, 2 one dense call at 4096.
void packed(benchmark::State& state) {
  const index_t count = 16, each = 256, total = count * each;
  const auto q = random_input(total, heads, 1), k = random_input(total, heads, 2), v = random_input(total, heads, 3);
  tensor<float> o(1, total, heads, dim);
  std::vector<float> lse(std::size_t(heads * total));
  std::vector<index_t> cu_seqlens;
  for (index_t s = 0; s <= count; ++s) cu_seqlens.push_back(s * each);
  const std::vector<sequence> sequences = packed_sequences(cu_seqlens);
  const alibi<float> bias{heads};
  const attention_options<float> causal{.mask = masking::causal};
  attention_options<float> packed_options = causal;
  packed_options.sequences = sequences;
  std::vector<float> lse_one(std::size_t(heads * each));
  for (auto _ : state) {
    if (state.range(0) == 0) {
      attention(q.view(), k.view(), v.view(), bias, packed_options, o.view(), lse);
    } else if (state.range(0) == 1) {
      for (index_t s = 0; s < count; ++s)
        attention(q.view().positions(s * each, each), k.view().positions(s * each, each), v.view().positions(s * each, each), bias,
                  causal, o.view().positions(s * each, each), lse_one);
    } else {
      attention(q.view(), k.view(), v.view(), bias, causal, o.view(), lse);
    }
    benchmark::DoNotOptimize(o.data());
  }
  set_useful_gflops(state, state.range(0) == 2 ? causal_pairs(total, total) : double(count) * causal_pairs(each, each));
}

}  // namespace

int main(int argc, char** argv) {
  auto lengths = [](benchmark::internal::Benchmark* b) {
    for (int length : {4096, 8192, 16384}) b->Arg(length);
    b->ArgName("L")->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.3);
  };
  for_each_policy([&]<class Bias>(const char* name) {
    lengths(benchmark::RegisterBenchmark((std::string("window/") + name).c_str(), window_forward<Bias>));
  });
  lengths(benchmark::RegisterBenchmark("window_backward/none", window_backward<no_bias<float>>));
  lengths(benchmark::RegisterBenchmark("window_backward/alibi", window_backward<alibi<float>>));
  benchmark::RegisterBenchmark("padded/alibi", padded)->Arg(0)->Arg(1)->ArgName("padded")->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.3);
  benchmark::RegisterBenchmark("packed/alibi", packed)
      ->Arg(0)->Arg(1)->Arg(2)->ArgName("mode")->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.3);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
