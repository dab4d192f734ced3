#include "catch.hpp"

#include <relbias/bias/alibi.hpp>

#include <cmath>

using namespace relbias;

// Closed form of the authors' get_slopes (REFERENCES.md §3): with p = 2^floor(log2 H),
// h < p: 2^(-8(h+1)/p);  h >= p: 2^(-8(2(h-p)+1)/(2p)).
static double closed_form_slope(int num_heads, int h) {
  int p = 1;
  while (p * 2 <= num_heads) p *= 2;
  return h < p ? std::exp2(-8.0 * (h + 1) / p) : std::exp2(-8.0 * (2 * (h - p) + 1) / (2.0 * p));
}

TEST_CASE("alibi: slopes for 1..64 heads match the closed form of get_slopes", "[alibi]") {
  for (int n = 1; n <= 64; ++n) {
    const auto slopes = alibi_slopes<double>(n);
    REQUIRE(slopes.size() == std::size_t(n));
    for (int h = 0; h < n; ++h) CHECK(slopes[std::size_t(h)] == Approx(closed_form_slope(n, h)).epsilon(1e-14));
    const auto slopes_f = alibi_slopes<float>(n);
    for (int h = 0; h < n; ++h) CHECK(slopes_f[std::size_t(h)] == float(slopes[std::size_t(h)]));
  }
}

TEST_CASE("alibi: published example values, including non-powers of two", "[alibi]") {
  // get_slopes(3) == [1/16, 1/256, 1/4] (interleaved from get_slopes(4)... of 2p = 4)
  CHECK(alibi_slopes<double>(3) == std::vector<double>{1.0 / 16, 1.0 / 256, 1.0 / 4});
  // get_slopes(8) == [1/2, 1/4, ..., 1/256]
  const auto s8 = alibi_slopes<double>(8);
  for (int h = 0; h < 8; ++h) CHECK(s8[std::size_t(h)] == std::ldexp(1.0, -(h + 1)));
  // get_slopes(12): 2^-1..2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
  const auto s12 = alibi_slopes<double>(12);
  CHECK(s12[7] == std::ldexp(1.0, -8));
  CHECK(s12[8] == Approx(std::exp2(-0.5)).epsilon(1e-15));
  CHECK(s12[11] == Approx(std::exp2(-3.5)).epsilon(1e-15));
}

TEST_CASE("alibi: bias is -m_h |i - j|, the doc example holds", "[alibi]") {
  const alibi<float> b{8};
  CHECK(b(0, 5, 2) == -1.5f);
  CHECK(b(0, 2, 5) == -1.5f);  // bidirectional symmetry
  CHECK(b(7, 100, 0) == -100.0f / 256.0f);
  // shift invariance
  for (index_t i = 0; i < 20; ++i)
    for (index_t j = 0; j < 20; ++j) CHECK(b(3, i, j) == b(3, i + 1000, j + 1000));
  // monotone decay with distance
  for (index_t d = 1; d < 50; ++d) CHECK(b(2, d, 0) < b(2, d - 1, 0));
}

TEST_CASE("alibi: max_bias follows ggml and agrees with the authors at 8", "[alibi]") {
  for (int n : {1, 3, 5, 8, 12, 20}) {
    const alibi<double> paper{n};
    const alibi<double> ggml{n, 8.000000000000001};  // ggml path, same formula
    for (int h = 0; h < n; ++h) CHECK(ggml.slope(h) == Approx(paper.slope(h)).epsilon(1e-14));
  }
  const alibi<double> flat{4, 0.0};
  for (int h = 0; h < 4; ++h) CHECK(flat.slope(h) == 1.0);
  const alibi<double> b16{4, 16.0};  // m0 = 2^(-16/4) = 1/16
  CHECK(b16.slope(0) == Approx(1.0 / 16));
  CHECK(b16.slope(1) == Approx(1.0 / 256));
}

TEST_CASE("alibi: invalid construction names the argument", "[alibi]") {
  CHECK_THROWS_WITH(alibi<float>(0), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_AS(alibi<float>(4, std::nan("")), std::invalid_argument);
  CHECK_THROWS_AS(alibi_slopes<float>(-2), std::invalid_argument);
}

TEST_CASE("alibi: trainable slopes expose parameters and their gradient", "[alibi]") {
  alibi<double, true> b{4};
  REQUIRE(b.parameters().size() == 4);
  b.parameters()[1] = 0.5;
  CHECK(b(1, 4, 0) == -2.0);
  param_vector<double> grad = param_vector<double>::Zero(4);
  const std::vector<double> d_bias{1.0, 2.0, 3.0};  // offsets -1, 0, 1
  b.accumulate_offset_gradient(1, -1, d_bias, std::span<double>(grad.data(), 4));
  CHECK(grad[1] == -(1.0 * 1 + 2.0 * 0 + 3.0 * 1));
  CHECK(grad[0] == 0.0);
}
