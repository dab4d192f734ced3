// Batched decoding: a server holds sequences of different prompt lengths in one KV cache with a
// fixed capacity per slot. It prefills every prompt in one padded call, then advances all of
// them one token per step in one call per step, each sequence at its own position; a sequence
// that has finished leaves its slot idle. Every step must equal running that sequence alone
// (same bits): the program exits non-zero otherwise.
#include <relbias/relbias.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

using relbias::index_t;

namespace {

constexpr index_t slots = 4, heads = 4, kv_heads = 2, dim = 16, capacity = 48;

/// Batch element b of t as a batch of one (same memory).
template <class T>
relbias::tensor_view<T> element(relbias::tensor_view<T> t, index_t b) {
  t.data += b * t.batch_stride;
  t.batch = 1;
  return t;
}

/// Stand-in for a model's projections: q, k, v of a token from its position and a feature
/// (the previous output), written into row `row` of batch element b.
void project(float feature, index_t position, index_t b, index_t row, relbias::tensor<float>& q, relbias::tensor<float>& k,
             relbias::tensor<float>& v) {
  for (index_t h = 0; h < heads; ++h)
    for (index_t d = 0; d < dim; ++d) q(b, row, h, d) = std::sin(0.3f * float(position + d + h) + feature);
  for (index_t h = 0; h < kv_heads; ++h)
    for (index_t d = 0; d < dim; ++d) {
      k(b, row, h, d) = std::cos(0.2f * float(position * (d + 1) + h) - feature);
      v(b, row, h, d) = std::sin(0.7f * float(position + 2 * d + h) + 0.5f * feature);
    }
}

/// Row `row` of batch element b of `got` against row 0 of `alone`, bit for bit.
bool same_row(const relbias::tensor<float>& got, index_t b, index_t row, const relbias::tensor<float>& alone, index_t alone_row) {
  for (index_t h = 0; h < heads; ++h)
    for (index_t d = 0; d < dim; ++d)
      if (got(b, row, h, d) != alone(0, alone_row, h, d)) return false;
  return true;
}

}  // namespace

int main() {
  const std::vector<index_t> prompt{5, 12, 1, 9}, to_generate{10, 3, 20, 7};
  const index_t longest_prompt = *std::max_element(prompt.begin(), prompt.end());
  relbias::t5<float> bias{heads, relbias::masking::causal};
  bias.reset_parameters(/*seed=*/3, /*d_model=*/64.0);
  const relbias::attention_options<float> causal{.mask = relbias::masking::causal, .scale = 1.0f};  // T5: no 1/sqrt(d)

  // The KV cache: capacity rows per slot, the first `filled[b]` of them in use.
  relbias::tensor<float> k_cache(slots, capacity, kv_heads, dim), v_cache(slots, capacity, kv_heads, dim);
  std::vector<index_t> filled = prompt;
  bool all_equal = true;

  // Prefill: the prompts right-padded into one [slots, longest_prompt] query tensor, one call.
  relbias::tensor<float> q_prompt(slots, longest_prompt, heads, dim);
  for (index_t b = 0; b < slots; ++b)
    for (index_t t = 0; t < prompt[std::size_t(b)]; ++t) project(0.1f * float(b), t, b, t, q_prompt, k_cache, v_cache);
  const std::vector<relbias::sequence> prompts = relbias::padded_sequences(prompt, longest_prompt);
  auto prefill_options = causal;
  prefill_options.sequences = prompts;
  const auto prefilled = relbias::attention(q_prompt.view(), k_cache.view(), v_cache.view(), bias, prefill_options);
  for (index_t b = 0; b < slots; ++b) {
    const index_t n = prompt[std::size_t(b)];
    const auto alone = relbias::attention(element(q_prompt.view(), b).positions(0, n), element(k_cache.view(), b).positions(0, n),
                                          element(v_cache.view(), b).positions(0, n), bias, causal);
    for (index_t t = 0; t < n; ++t) all_equal = all_equal && same_row(prefilled.out, b, t, alone.out, t);
  }

  // Decoding: each step appends one token per active slot and attends over its own filled keys.
  std::vector<float> feature(slots);
  for (index_t b = 0; b < slots; ++b) feature[std::size_t(b)] = prefilled.out(b, prompt[std::size_t(b)] - 1, 0, 0);
  relbias::tensor<float> q_step(slots, 1, heads, dim);
  index_t steps = 0, calls = 0;
  for (;; ++steps) {
    std::vector<index_t> key_lengths(slots, 0);  // 0: the slot is idle
    for (index_t b = 0; b < slots; ++b) {
      if (filled[std::size_t(b)] - prompt[std::size_t(b)] >= to_generate[std::size_t(b)]) continue;
      const index_t position = filled[std::size_t(b)]++;
      project(feature[std::size_t(b)], position, b, 0, q_step, k_cache, v_cache);
      key_lengths[std::size_t(b)] = filled[std::size_t(b)];
    }
    if (std::all_of(key_lengths.begin(), key_lengths.end(), [](index_t n) { return n == 0; })) break;

    const std::vector<relbias::sequence> step = relbias::decoding_sequences(key_lengths, 1, capacity);
    auto options = causal;
    options.sequences = step;
    const auto out = relbias::attention(q_step.view(), k_cache.view(), v_cache.view(), bias, options);
    ++calls;

    for (index_t b = 0; b < slots; ++b) {
      const index_t n = key_lengths[std::size_t(b)];
      if (n == 0) continue;
      auto alone_options = causal;
      alone_options.q_start = relbias::kv_cache_q_start(1, n);
      const auto alone = relbias::attention(element(q_step.view(), b), element(k_cache.view(), b).positions(0, n),
                                            element(v_cache.view(), b).positions(0, n), bias, alone_options);
      all_equal = all_equal && same_row(out.out, b, 0, alone.out, 0);
      feature[std::size_t(b)] = out.out(b, 0, 0, 0);
    }
  }

  std::printf("%ld slots, prompts 5/12/1/9, %ld decoding steps in %ld batched calls; filled lengths:", long(slots), long(steps),
              long(calls));
  for (index_t n : filled) std::printf(" %ld", long(n));
  std::printf(" of capacity %ld\nevery prefill row and decoding step equals its sequence run alone: %s\n", long(capacity),
              all_equal ? "yes" : "NO");
  return all_equal ? 0 : 1;
}
