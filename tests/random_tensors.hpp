#pragma once
// Seeded random inputs for kernel tests.

#include <relbias/detail/random.hpp>
#include <relbias/tensor.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace relbias_test {

using relbias::index_t;

/// A [batch, seq, heads, dim] tensor of uniform values in [-1, 1).
template <class S>
relbias::tensor<S> random_tensor(index_t batch, index_t seq, index_t heads, index_t dim, std::uint64_t seed) {
  relbias::tensor<S> t(batch, seq, heads, dim);
  relbias::detail::random_stream rng(seed);
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = S(rng.uniform(-1.0, 1.0));
  return t;
}

/// max |a - b| / max(|b|, 1) over two equally shaped views (the STYLE.md tolerance measure);
/// equal values count as equal also when infinite (the lse of a row that sees no key).
template <class S>
double max_relative_error(relbias::tensor_view<const S> a, relbias::tensor_view<const S> b) {
  double worst = 0;
  for (index_t n = 0; n < a.batch; ++n)
    for (index_t s = 0; s < a.seq; ++s)
      for (index_t h = 0; h < a.heads; ++h)
        for (index_t d = 0; d < a.dim; ++d) {
          const double x = a.row(n, s, h)[d], y = b.row(n, s, h)[d];
          if (x == y) continue;
          if (!std::isfinite(x - y)) return std::numeric_limits<double>::infinity();  // NaN, or one side infinite
          worst = std::max(worst, std::abs(x - y) / std::max(std::abs(y), 1.0));
        }
  return worst;
}

/// A copy of `from` with its elements converted to To (relbias::convert: float to bf16 or half
/// rounds to nearest even).
template <class To, class From>
relbias::tensor<To> copy_as(const relbias::tensor<From>& from) {
  const auto v = from.view();
  relbias::tensor<To> to(v.batch, v.seq, v.heads, v.dim);
  relbias::convert(v, to.view());
  return to;
}

/// The same logical tensor copied into [batch, heads, seq, dim] memory (view it with bhsd()).
template <class S>
std::vector<S> to_bhsd(const relbias::tensor<S>& t) {
  const auto v = t.view();
  std::vector<S> out(std::size_t(t.size()));
  const auto w = relbias::bhsd(out.data(), v.batch, v.heads, v.seq, v.dim);
  for (index_t b = 0; b < v.batch; ++b)
    for (index_t s = 0; s < v.seq; ++s)
      for (index_t h = 0; h < v.heads; ++h) std::copy(v.row(b, s, h), v.row(b, s, h) + v.dim, w.row(b, s, h));
  return out;
}

}  // namespace relbias_test
