// A bias policy of your own: anything with scalar_type, num_heads() and operator()(h, i, j)
// satisfies relbias::bias_policy and runs in every kernel. Declaring is_shift_invariant and
// at_offset(h, delta) lets the fused kernel tabulate it once per call instead of per element.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>

// Local attention window: keys further than `width` positions away get a large penalty.
struct window_bias {
  using scalar_type = double;
  static constexpr bool is_shift_invariant = true;  // depends only on delta = i - j

  relbias::index_t heads, width;
  relbias::index_t num_heads() const { return heads; }
  double at_offset(relbias::index_t, relbias::index_t delta) const { return std::abs(delta) <= width ? 0.0 : -1e4; }
  double operator()(relbias::index_t h, relbias::index_t i, relbias::index_t j) const { return at_offset(h, i - j); }
};
static_assert(relbias::bias_policy<window_bias>);
static_assert(relbias::shift_invariant_bias<window_bias>);

// A periodic bias that is not shift invariant: the generic per-element path.
struct periodic_bias {
  using scalar_type = double;
  relbias::index_t heads;
  relbias::index_t num_heads() const { return heads; }
  double operator()(relbias::index_t h, relbias::index_t i, relbias::index_t j) const {
    return 0.5 * std::cos(0.3 * double(i) - 0.2 * double(j) * double(h + 1));
  }
};
static_assert(relbias::bias_policy<periodic_bias>);

int main() {
  const relbias::index_t seq = 64, heads = 2, dim = 16;
  relbias::tensor<double> q(1, seq, heads, dim), k(1, seq, heads, dim), v(1, seq, heads, dim);
  for (relbias::index_t n = 0; n < q.size(); ++n) {
    q.data()[n] = std::sin(0.1 * double(n));
    k.data()[n] = std::cos(0.07 * double(n));
    v.data()[n] = std::sin(0.05 * double(n) + 1.0);
  }
  double worst = 0;
  auto compare = [&](const auto& bias) {
    const auto fused = relbias::attention(q.view(), k.view(), v.view(), bias);
    const auto reference = relbias::reference_attention(q.view(), k.view(), v.view(), bias);
    for (relbias::index_t n = 0; n < fused.out.size(); ++n)
      worst = std::max(worst, std::abs(fused.out.data()[n] - reference.out.data()[n]));
  };
  compare(window_bias{heads, 4});
  compare(periodic_bias{heads});
  std::printf("fused vs reference, max |difference| = %.3g\n", worst);
  return worst < 1e-12 ? 0 : 1;
}
