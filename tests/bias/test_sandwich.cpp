#include "catch.hpp"

#include <relbias/bias/sandwich.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

using namespace relbias;

namespace {

struct golden {
  index_t heads, dim, h, delta;
  double bias;
};

// NeMo's SandwichRelativePositionEmbedding.forward, for one head and offset:
//   (sum_{k=1}^{d/2} cos(|delta| / 10000^(2k/d)) - d/2) / ((h + 1) * 8 / H)
// computed with /usr/bin/python3 (math.fsum) in the equivalent form
//   sum_k -2 sin^2(|delta| / 10000^(2k/d) / 2) / ((h + 1) * 8 / H),
// which agrees with the direct cosine sum to 4e-15 absolute (that sum cancels in its last digits).
constexpr golden goldens[] = {
    {8, 64, 0, 3, -4.422979001070374},    {8, 64, 0, 1, -0.6234706492491138},
    {4, 16, 0, 1, -0.027568033690319772}, {4, 16, 3, 1, -0.006892008422579943},
    {4, 16, 1, 7, -0.4654291279813504},   {4, 16, 2, -100, -0.7291671853187657},
    {4, 16, 0, 1000, -2.9947719598727542}, {8, 64, 7, 2048, -4.1551331929123725},
    {8, 64, 3, -5, -1.9449228750033987},  {1, 2, 0, 1, -6.249999994791668e-10},
    {12, 128, 5, 37, -7.089602943190609}, {4, 16, 0, 100000, -3.623443137008776},
    {3, 6, 2, 12345, -0.27912095496039685},
};

}  // namespace

TEST_CASE("sandwich: golden values of NeMo's formula", "[sandwich]") {
  for (const golden& g : goldens) {
    INFO("H=" << g.heads << " d=" << g.dim << " h=" << g.h << " delta=" << g.delta);
    const sandwich<double> b{g.heads, g.dim};
    // The arguments |delta| w_k carry a rounding of |delta| w_k eps whichever way they are formed
    // (NeMo: |delta| * inv_freq; Python: |delta| / 10000^(2k/d)), so the margin grows with |delta|.
    const double margin = 1e-15 + double(distance(g.delta, 0)) * double(g.dim) * 1e-16;
    CHECK(b.at_offset(g.h, g.delta) == Approx(g.bias).epsilon(1e-13).margin(margin));
    // float: the double value rounded once
    CHECK(sandwich<float>{g.heads, g.dim}.at_offset(g.h, g.delta) == float(b.at_offset(g.h, g.delta)));
  }
}

TEST_CASE("sandwich: the documented example and NeMo's constants", "[sandwich]") {
  const sandwich<double> b{8, 64};
  CHECK(b(0, 5, 2) == Approx(-4.42297900107037).epsilon(1e-14));
  CHECK(b.num_heads() == 8);
  CHECK(b.dim() == 64);
  // divisors h_n = 8 n / H: head h's bias is head 0's over (h + 1)
  for (index_t h = 0; h < 8; ++h) {
    CHECK(b.compression(h) == double(h + 1));
    CHECK(b.at_offset(h, 40) * double(h + 1) == Approx(b.at_offset(0, 40)).epsilon(1e-15));
  }
  CHECK(sandwich<double>{4, 16}.compression(0) == 2.0);
  // d = 2: one term at frequency 10000^-1 (k runs 1 .. d/2, so the slowest frequency is 1e-4)
  const sandwich<double> one{1, 2};  // divisor 8
  CHECK(one.at_offset(0, 20000) == Approx((std::cos(2.0) - 1.0) / 8.0).epsilon(1e-14));
}

TEST_CASE("sandwich: shift invariance, symmetry, zero diagonal and bounds", "[sandwich]") {
  const sandwich<double> b{4, 16};
  const sandwich<float> f{6, 32};
  for (index_t h = 0; h < 4; ++h) {
    CHECK(b.at_offset(h, 0) == 0.0);
    CHECK(f.at_offset(h, 0) == 0.0f);
    for (index_t i = 0; i < 30; ++i)
      for (index_t j = 0; j < 30; ++j) {
        CHECK(b(h, i, j) == b(h, i + 977, j + 977));
        CHECK(f(h, i, j) == f(h, i + 4096, j + 4096));
        CHECK(b(h, i, j) == b(h, j, i));  // bidirectional: a function of |i - j|
        CHECK(f(h, i, j) == f.at_offset(h, i - j));
      }
    // each cosine term lies in [-2, 0] after subtracting 1: bias in [-d / h_n, 0]
    for (index_t d = 1; d < 3000; d += 7) {
      CHECK(b.at_offset(h, d) < 0.0);
      CHECK(b.at_offset(h, d) >= -16.0 / b.compression(h));
    }
  }
  // the paper's decaying pattern: on average farther keys get a lower bias
  double near = 0, far = 0;
  for (index_t d = 1; d <= 50; ++d) near += b.at_offset(0, d);
  for (index_t d = 5001; d <= 5050; ++d) far += b.at_offset(0, d);
  CHECK(far < near);
}

TEST_CASE("sandwich: the kernels' plan holds at_offset's values, the sum once per distance", "[sandwich]") {
  // Windows: a training call straddling offset 0, a decoding step far into a cache (offsets all
  // positive), keys after the queries (all negative), distances past 10^6, and windows that start
  // mid-way through the plan's 64-distance anchors.
  const position_window windows[] = {
      {.q_start = 0, .query_length = 300, .k_start = 0, .key_length = 300},
      {.q_start = 40000, .query_length = 1, .k_start = 0, .key_length = 40001},
      {.q_start = 0, .query_length = 5, .k_start = 130, .key_length = 77},
      {.q_start = 1'234'567, .query_length = 3, .k_start = 1'100'000, .key_length = 1000},
      {.q_start = 70, .query_length = 1, .k_start = 3, .key_length = 2},
  };
  const sandwich<double> b{3, 16};
  const sandwich<float> f{5, 64};
  for (const position_window& w : windows) {
    INFO("offsets [" << w.min_offset() << ", " << w.max_offset() << "]");
    const auto plan_b = b.make_plan(w);
    const auto plan_f = f.make_plan(w);
    double worst_b = 0;
    index_t float_mismatches = 0;
    for (index_t delta = w.min_offset(); delta <= w.max_offset(); ++delta) {
      // query i = max_offset, key j0 = max_offset - delta: row_values(h, i, j0)[0] is offset delta
      for (index_t h = 0; h < 3; ++h)
        worst_b = std::max(worst_b, std::abs(*plan_b.row_values(h, w.max_offset(), w.max_offset() - delta) - b.at_offset(h, delta)));
      for (index_t h = 0; h < 5; ++h) {
        const float expected = f.at_offset(h, delta), got = *plan_f.row_values(h, w.max_offset(), w.max_offset() - delta);
        CHECK(std::abs(got - expected) <= std::numeric_limits<float>::epsilon() * std::abs(expected));  // at most one rounding apart
        float_mismatches += got != expected;
      }
    }
    // The angles x w_k / 2 carry one rounding each way (relative 2^-53): their difference in the
    // sum grows with the distance, ~2e-16 x here (d = 16, H = 3).
    CHECK(worst_b < 2e-15 * double(std::max<index_t>(1, w.max_distance())));
    CHECK(float_mismatches * 100 <= w.offset_count() * 5);  // the same float in nearly every case
  }
}

TEST_CASE("sandwich: invalid constructions name the argument and value", "[sandwich]") {
  CHECK_THROWS_WITH(sandwich<float>(0, 64), Catch::Contains("relbias::sandwich") && Catch::Contains("num_heads") &&
                                                Catch::Contains("got 0"));
  CHECK_THROWS_WITH(sandwich<double>(-3, 64), Catch::Contains("num_heads") && Catch::Contains("-3"));
  CHECK_THROWS_WITH(sandwich<double>(4, 0), Catch::Contains("dim must be even") && Catch::Contains("got 0"));
  CHECK_THROWS_WITH(sandwich<double>(4, 15), Catch::Contains("dim") && Catch::Contains("got 15"));
  CHECK_THROWS_WITH(sandwich<float>(4, -2), Catch::Contains("dim") && Catch::Contains("-2"));
  CHECK_THROWS_AS(sandwich<float>(4, std::numeric_limits<index_t>::max() - 1), std::invalid_argument);
  CHECK_THROWS_AS(sandwich<float>(std::numeric_limits<index_t>::max(), 2), std::invalid_argument);
  CHECK_NOTHROW(sandwich<float>(1, 2));
}
