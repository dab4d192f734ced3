// One decoding step (Lq = 1) against a KV cache of Lk keys.
//   decode/<policy>: every bias scheme, float cache, the float attention(). GB/s counts
//     2 * Lk * heads * d * 4 bytes per step (K and V streamed once).
//   storage/<fp32|f16|bf16>: no bias, float query, the cache stored as float, Eigen::half or
//     Eigen::bfloat16, all through the loop of attention_half.hpp, so the formats differ only in
//     the bytes they stream (2 * Lk * heads * d * sizeof(element) per step); tokens/s = steps/s.
//   probe/copy, probe/read: the machine's memory bandwidth in the same run, on as many threads as
//     a decoding step uses, over a buffer the size of the float cache: memcpy (GB/s counts bytes
//     read + written, STREAM's convention) and a read-only sum (bytes read, the traffic of decoding).
#include "policies.hpp"

#include <relbias/attention_half.hpp>

#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace relbias;
using namespace relbias_bench;

namespace {

void set_bytes_per_second(benchmark::State& state, double bytes) {
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

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
  set_bytes_per_second(state, 2.0 * double(keys) * heads * dim * sizeof(float));
}

/// A cache in T laid out [batch, heads, seq, dim] (Hugging Face's cache layout): each head's keys
/// are one contiguous stream.
template <class T>
struct head_major_cache {
  std::vector<T> memory;
  tensor_view<const T> view;

  explicit head_major_cache(const tensor<float>& values) : memory(std::size_t(values.size())) {
    const auto from = values.view();
    const tensor_view<T> to = bhsd(memory.data(), from.batch, from.heads, from.seq, from.dim);
    convert(from, to);
    view = to;
  }
};

template <class T>
void decode_storage(benchmark::State& state) {
  const index_t keys = state.range(0);
  const auto q = random_input(1, heads, 1);
  const head_major_cache<T> k(random_input(keys, heads, 2)), v(random_input(keys, heads, 3));
  tensor<float> o(1, 1, heads, dim);
  const no_bias<float> bias{heads};
  const attention_options<float> options{.mask = masking::causal, .q_start = kv_cache_q_start(1, keys)};
  for (auto _ : state) {
    // The float cache takes the same loop (not public: attention() of float tensors is the tiled kernel).
    detail::attention_storage<no_bias<float>, float, T>(q.view(), k.view, v.view, bias, options, o.view(), {});
    benchmark::DoNotOptimize(o.data());
  }
  set_bytes_per_second(state, 2.0 * double(keys) * heads * dim * sizeof(T));
  state.counters["tokens/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
}

/// Calls work(begin, end) on each thread's slice of [0, n), on the threads a decoding step uses.
template <class Work>
void on_every_thread(std::size_t n, Work work) {
#ifdef _OPENMP
#pragma omp parallel num_threads(detail::thread_count(0))
  {
    const auto t = std::size_t(omp_get_thread_num()), threads = std::size_t(omp_get_num_threads());
    work(n * t / threads, n * (t + 1) / threads);
  }
#else
  work(0, n);
#endif
}

void probe_copy(benchmark::State& state) {
  const auto bytes = std::size_t(state.range(0)) << 20;
  std::vector<char> from(bytes, 1), to(bytes, 0);  // written once: every page mapped before timing
  for (auto _ : state) {
    on_every_thread(bytes, [&](std::size_t begin, std::size_t end) { std::memcpy(to.data() + begin, from.data() + begin, end - begin); });
    benchmark::ClobberMemory();
  }
  set_bytes_per_second(state, 2.0 * double(bytes));
}

void probe_read(benchmark::State& state) {
  const auto bytes = std::size_t(state.range(0)) << 20;
  std::vector<float> values(bytes / sizeof(float), 1.0f);
  for (auto _ : state)
    on_every_thread(values.size(), [&](std::size_t begin, std::size_t end) {
      const float sum = Eigen::Map<const Eigen::ArrayXf>(values.data() + begin, Eigen::Index(end - begin)).sum();
      benchmark::DoNotOptimize(sum);
    });
  set_bytes_per_second(state, double(bytes));
}

}  // namespace

int main(int argc, char** argv) {
  for_each_policy([]<class Bias>(const char* name) {
    benchmark::RegisterBenchmark((std::string("decode/") + name).c_str(), decode<Bias>)
        ->ArgName("Lk")->RangeMultiplier(4)->Range(2048, 32768)->Unit(benchmark::kMicrosecond)->UseRealTime();
  });
  const auto storage = [](const char* name, auto run) {
    benchmark::RegisterBenchmark((std::string("storage/") + name).c_str(), run)
        ->ArgName("Lk")->Arg(2048)->Arg(32768)->Unit(benchmark::kMicrosecond)->UseRealTime();
  };
  storage("fp32", decode_storage<float>);
  storage("f16", decode_storage<Eigen::half>);
  storage("bf16", decode_storage<Eigen::bfloat16>);
  const index_t float_cache_mib = 2 * 32768 * heads * dim * index_t(sizeof(float)) >> 20;  // 128 MiB
  for (const auto& [name, probe] : {std::pair{"probe/copy", &probe_copy}, {"probe/read", &probe_read}})
    benchmark::RegisterBenchmark(name, probe)->ArgName("MiB")->Arg(float_cache_mib)->Unit(benchmark::kMicrosecond)->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
