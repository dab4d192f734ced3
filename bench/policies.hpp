#pragma once
// The bias schemes the suite compares, each built as a user would for a given mask, plus the
// shared shapes and random inputs of the benchmarks.

#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/sandwich.hpp>
#include <relbias/bias/t5.hpp>
#include <relbias/detail/random.hpp>
#include <relbias/tensor.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

namespace relbias_bench {

using relbias::index_t;
using relbias::masking;

inline constexpr index_t heads = 8, dim = 64;

template <class Bias>
Bias make_bias(masking mask);

template <>
inline relbias::no_bias<float> make_bias(masking) { return relbias::no_bias<float>{heads}; }
template <>
inline relbias::alibi<float> make_bias(masking) { return relbias::alibi<float>{heads}; }
template <>
inline relbias::t5<float> make_bias(masking mask) {
  relbias::t5<float> bias{heads, mask, 32, 128};
  bias.reset_parameters(1, 512.0);
  return bias;
}
template <>
inline relbias::per_offset<float> make_bias(masking mask) {
  relbias::per_offset<float> bias{heads, mask, 128};
  bias.reset_parameters(1, 0.02);
  return bias;
}
template <>
inline relbias::kerple_power<float> make_bias(masking) { return relbias::kerple_power<float>{heads, 1}; }
template <>
inline relbias::kerple_log<float> make_bias(masking) { return relbias::kerple_log<float>{heads, 1}; }
template <>
inline relbias::fire<float> make_bias(masking) { return relbias::fire<float>{heads, 1}; }
// As NeMo builds it: the sinusoid dimension is the head dimension.
template <>
inline relbias::sandwich<float> make_bias(masking) { return relbias::sandwich<float>{heads, dim}; }

/// [1, seq, heads, dim] of uniform values in [-1, 1).
inline relbias::tensor<float> random_input(index_t seq, index_t num_heads, std::uint64_t seed) {
  relbias::tensor<float> t(1, seq, num_heads, dim);
  relbias::detail::random_stream rng(seed);
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = float(rng.uniform(-1, 1));
  return t;
}

/// Useful FLOPs of one forward: 4 Lq Lk d per head (Q K^T and P V), halved for causal.
inline double forward_flops(index_t lq, index_t lk, bool causal) {
  return 4.0 * double(lq) * double(lk) * double(dim) * double(heads) * (causal ? 0.5 : 1.0);
}

inline void set_gflops(benchmark::State& state, double flops) {
  state.counters["GFLOPS"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Calls visit.template operator()<Bias>(name) for every scheme, the baseline first.
template <class Visitor>
void for_each_policy(Visitor&& visit) {
  visit.template operator()<relbias::no_bias<float>>("none");
  visit.template operator()<relbias::alibi<float>>("alibi");
  visit.template operator()<relbias::t5<float>>("t5");
  visit.template operator()<relbias::per_offset<float>>("per_offset");
  visit.template operator()<relbias::kerple_power<float>>("kerple_power");
  visit.template operator()<relbias::kerple_log<float>>("kerple_log");
  visit.template operator()<relbias::fire<float>>("fire");
  visit.template operator()<relbias::sandwich<float>>("sandwich");
}

/// main() of the one-shot tools (bench_memory, bench_once): `tool <policy> <L> <forward|backward>`
/// calls run.template operator()<Bias>(name, L, backward) for the policy named.
template <class Run>
int run_policy_command(int argc, char** argv, Run&& run) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <policy> <L> <forward|backward>\n", argv[0]);
    return 2;
  }
  const std::string wanted = argv[1];
  const index_t length = std::stol(argv[2]);
  const bool backward = std::string(argv[3]) == "backward";
  bool found = false;
  for_each_policy([&]<class Bias>(const char* name) {
    if (wanted != name) return;
    run.template operator()<Bias>(name, length, backward);
    found = true;
  });
  if (!found) std::fprintf(stderr, "unknown policy %s\n", argv[1]);
  return found ? 0 : 2;
}

}  // namespace relbias_bench

