// One decoding step (Lq = 1) against a KV cache of Lk keys.
//   decode/<policy>: every bias scheme, float cache, the float attention(). GB/s counts
//     2 * Lk * heads * d * 4 bytes per step (K and V streamed once).
//   storage/<fp32|f16|bf16>: no bias, float query, the cache stored as float, Eigen::half or
//     Eigen::bfloat16, all through the loop of attention_half.hpp, so the formats differ only in
//     the bytes they stream (2 * Lk * heads * d * sizeof(element) per step); tokens/s = steps/s.
//   paged/<fp32|bf16>: the storage/* step (no bias, float query, 8 heads, d = 64) through the public
//     attention(), its keys contiguous [1, Lk, heads, d] (block:0) or in a pool of blocks of 16,
//     64 or 256 keys [num_blocks, block, heads, d] read through a block table whose blocks are
//     shuffled (a pool after some serving: no two neighbours adjacent); tokens/s = steps/s,
//     compare paged/*/block:B with paged/*/block:0 of the same Lk (bench/README.md, docs/paged.md).
//   probe/copy, probe/read: the machine's memory bandwidth in the same run, on as many threads as
//     a decoding step uses, over a buffer the size of the float cache: memcpy (GB/s counts bytes
//     read + written, STREAM's convention) and a read-only sum (bytes read, the traffic of decoding).
#include "policies.hpp"

#include <relbias/attention_half.hpp>
#include <relbias/paged.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
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

/// One decoding step over Lk keys stored as T, contiguous (block = 0) or paged with shuffled blocks.
template <class T>
void decode_paged(benchmark::State& state) {
  const index_t keys = state.range(0), block = state.range(1);
  const auto q = random_input(1, heads, 1);
  const auto k_values = random_input(keys, heads, 2), v_values = random_input(keys, heads, 3);
  tensor<T> k(1, keys, heads, dim), v(1, keys, heads, dim);
  convert(k_values.view(), k.view());
  convert(v_values.view(), v.view());
  tensor<float> o(1, 1, heads, dim);
  const no_bias<float> bias{heads};
  attention_options<float> options{.mask = masking::causal};
  const std::vector<index_t> lengths{keys};
  options.sequences = decoding_sequences(lengths, 1, keys);
  std::vector<std::int32_t> table;
  if (block > 0) {  // logical block m of the sequence in pool block table[m], a shuffled permutation
    const index_t blocks = keys / block;
    table.resize(std::size_t(blocks));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(7));
    tensor<T> k_pool(blocks, block, heads, dim), v_pool(blocks, block, heads, dim);
    for (index_t m = 0; m < blocks; ++m)
      for (const auto& [from, to] : {std::pair{&k, &k_pool}, {&v, &v_pool}})
        std::copy_n(from->view().row(0, m * block, 0), block * heads * dim, to->view().row(table[std::size_t(m)], 0, 0));
    options.paged = paged_kv{block, block_table(std::span<const std::int32_t>(table), 1, blocks)};
    k = std::move(k_pool);  // the contiguous copy is freed: both variants hold one cache
    v = std::move(v_pool);
  }
  for (auto _ : state) {
    attention(q.view(), k.view(), v.view(), bias, options, o.view());
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
  for (const auto& [name, run] : {std::pair{"paged/fp32", &decode_paged<float>}, {"paged/bf16", &decode_paged<Eigen::bfloat16>}})
    benchmark::RegisterBenchmark(name, run)
        ->ArgNames({"Lk", "block"})->ArgsProduct({{4096, 32768}, {0, 16, 64, 256}})->Unit(benchmark::kMicrosecond)->UseRealTime();
  const index_t float_cache_mib = 2 * 32768 * heads * dim * index_t(sizeof(float)) >> 20;  // 128 MiB
  for (const auto& [name, probe] : {std::pair{"probe/copy", &probe_copy}, {"probe/read", &probe_read}})
    benchmark::RegisterBenchmark(name, probe)->ArgName("MiB")->Arg(float_cache_mib)->Unit(benchmark::kMicrosecond)->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
