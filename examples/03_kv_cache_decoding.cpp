// KV-cache decoding: feed one token at a time against the growing cache, with the query at its
// absolute position (q_start = kv_cache_q_start(1, cached keys)). Each step reproduces the row
// of the full causal pass, bias included (T5 buckets here; any policy works the same way).
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>

int main() {
  using relbias::index_t;
  const index_t steps = 40, heads = 4, dim = 16;
  relbias::tensor<float> q(1, steps, heads, dim), k(1, steps, heads, dim), v(1, steps, heads, dim);
  for (index_t n = 0; n < q.size(); ++n) {
    q.data()[n] = std::sin(0.37f * float(n));
    k.data()[n] = std::cos(0.11f * float(n));
    v.data()[n] = std::sin(0.23f * float(n) + 0.5f);
  }
  relbias::t5<float> bias{heads, relbias::masking::causal};
  bias.reset_parameters(/*seed=*/1, /*d_model=*/64.0);
  const relbias::attention_options<float> causal{.mask = relbias::masking::causal, .scale = 1.0f};  // T5: no 1/sqrt(d)
  const auto full = relbias::attention(q.view(), k.view(), v.view(), bias, causal);

  float worst = 0;
  for (index_t t = 0; t < steps; ++t) {
    const index_t cached = t + 1;  // keys 0..t, the new token's included
    auto options = causal;
    options.q_start = relbias::kv_cache_q_start(1, cached);  // = t
    const auto step = relbias::attention(q.view().positions(t, 1), k.view().positions(0, cached),
                                         v.view().positions(0, cached), bias, options);
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < dim; ++d) worst = std::max(worst, std::abs(step.out(0, 0, h, d) - full.out(0, t, h, d)));
  }
  std::printf("%ld decoding steps, max |step - full causal pass| = %.3g\n", long(steps), double(worst));
  return worst < 1e-5f ? 0 : 1;
}
