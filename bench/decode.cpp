// One decoding step (Lq = 1) against a KV cache of Lk keys.
//   decode/<policy>: every bias scheme, float cache, the float attention(). GB/s counts
//     2 * Lk * heads * d * 4 bytes per step (K and V streamed once).
//   storage/<fp32|f16|bf16>: no bias, float query, the cache stored as float, Eigen::half or
//     Eigen::bfloat16, all through the loop of attention_half.hpp, so the formats differ only in
//     the bytes they stream (2 * Lk * heads * d * sizeof(element) per step); tokens/s = steps/s.
//   paged/<fp32|bf16>: the storage/* step (no bias, float query, 8 heads, d = 64) through the public
//     attention() over a paged cache: a pool of blocks of 16, 64 or 256 keys, each block head-major
//     in memory (vLLM's layout), read through a block table whose blocks are shuffled (a pool
//     after some serving: no two neighbours adjacent), each iteration against the same keys
//     contiguous, [batch, heads, seq, dim] as storage/*; time and tokens/s are the paged step's,
//     vs_contiguous = its tokens/s over the contiguous step's (docs/paged.md), vs_contiguous_cpu
//     the same from CPU time (steadier under other jobs, one thread). block = Lk (one block: the
//     contiguous memory behind a table) calibrates: it differs from 1 by the noise.
//   probe/copy, probe/read: the machine's memory bandwidth in the same run, on as many threads as
//     a decoding step uses, over a buffer the size of the float cache: memcpy (GB/s counts bytes
//     read + written, STREAM's convention) and a read-only sum (bytes read, the traffic of decoding).
#include "policies.hpp"

#include <relbias/attention_half.hpp>
#include <relbias/paged.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
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

/// CPU seconds of the process (every thread): with OMP_NUM_THREADS=1 a step's own time, which
/// other jobs on the machine stretch far less than its wall time (they take the core, not the
/// step's instructions).
double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

/// One decoding step over Lk keys stored as T in a pool of blocks of `block` keys read through a
/// shuffled block table, against the same step over the same keys contiguous: each iteration
/// runs both, in alternating order, so that both see the same machine (on a shared machine the
/// load changes faster than one benchmark runs). The reported time is the paged step's;
/// "vs_contiguous" = contiguous time / paged time over all iterations (tokens/s ratio);
/// "vs_contiguous_cpu" the same from CPU time (process_cpu_seconds), the one to read on a loaded
/// machine when run on one thread.
template <class T>
void decode_paged(benchmark::State& state) {
  using clock = std::chrono::steady_clock;
  const index_t keys = state.range(0), block = state.range(1), blocks = keys / block;
  const auto q = random_input(1, heads, 1);
  const head_major_cache<T> k(random_input(keys, heads, 2)), v(random_input(keys, heads, 3));
  std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));  // logical block m in pool block table[m]
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  // Pools [num_blocks, heads, block, dim] in memory (vLLM's head-major blocks), viewed as
  // [num_blocks, block, heads, dim]: a head's rows in a block are one contiguous run. Held in
  // relbias::tensor, which starts them on a page (docs/paged.md: unaligned pools ran slower).
  tensor<T> k_memory(blocks, heads, block, dim), v_memory(blocks, heads, block, dim);
  const tensor_view<T> k_pool{k_memory.data(), blocks, block, heads, dim, heads * block * dim, dim, block * dim};
  const tensor_view<T> v_pool{v_memory.data(), blocks, block, heads, dim, heads * block * dim, dim, block * dim};
  for (index_t m = 0; m < blocks; ++m)
    for (index_t h = 0; h < heads; ++h) {
      std::copy_n(k.view.row(0, m * block, h), block * dim, k_pool.row(table[std::size_t(m)], 0, h));
      std::copy_n(v.view.row(0, m * block, h), block * dim, v_pool.row(table[std::size_t(m)], 0, h));
    }
  tensor<float> o(1, 1, heads, dim);
  const no_bias<float> bias{heads};
  attention_options<float> contiguous{.mask = masking::causal};
  const std::vector<index_t> lengths{keys};
  contiguous.sequences = decoding_sequences(lengths, 1, keys);
  attention_options<float> paged = contiguous;
  paged.paged = paged_kv{block, block_table(std::span<const std::int32_t>(table), 1, blocks)};
  double paged_cpu = 0, contiguous_cpu = 0;
  const auto timed = [&](tensor_view<const T> keys_of, tensor_view<const T> values_of, const attention_options<float>& options,
                         double& cpu) {
    const double cpu_start = process_cpu_seconds();
    const auto start = clock::now();
    attention(q.view(), keys_of, values_of, bias, options, o.view());
    benchmark::DoNotOptimize(o.data());
    const double seconds = std::chrono::duration<double>(clock::now() - start).count();
    cpu += process_cpu_seconds() - cpu_start;
    return seconds;
  };
  double paged_seconds = 0, contiguous_seconds = 0;
  bool paged_first = false;
  for (auto _ : state) {
    double p = 0, c = 0;
    if (paged_first) p = timed(k_pool, v_pool, paged, paged_cpu), c = timed(k.view, v.view, contiguous, contiguous_cpu);
    else c = timed(k.view, v.view, contiguous, contiguous_cpu), p = timed(k_pool, v_pool, paged, paged_cpu);
    paged_first = !paged_first;
    state.SetIterationTime(p);
    paged_seconds += p;
    contiguous_seconds += c;
  }
  set_bytes_per_second(state, 2.0 * double(keys) * heads * dim * sizeof(T));
  state.counters["tokens/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["vs_contiguous"] = contiguous_seconds / paged_seconds;
  state.counters["vs_contiguous_cpu"] = contiguous_cpu / paged_cpu;
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
        ->ArgNames({"Lk", "block"})
        ->Args({4096, 16})->Args({4096, 64})->Args({4096, 256})->Args({4096, 4096})
        ->Args({32768, 16})->Args({32768, 64})->Args({32768, 256})->Args({32768, 32768})
        ->Unit(benchmark::kMicrosecond)->UseManualTime();
  const index_t float_cache_mib = 2 * 32768 * heads * dim * index_t(sizeof(float)) >> 20;  // 128 MiB
  for (const auto& [name, probe] : {std::pair{"probe/copy", &probe_copy}, {"probe/read", &probe_read}})
    benchmark::RegisterBenchmark(name, probe)->ArgName("MiB")->Arg(float_cache_mib)->Unit(benchmark::kMicrosecond)->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}
