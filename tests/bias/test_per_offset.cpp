#include "catch.hpp"
#include "../gradient_check.hpp"

#include <relbias/bias/per_offset.hpp>

#include <cmath>
#include <span>
#include <vector>

using namespace relbias;
using namespace relbias_test;

static_assert(offset_differentiable_bias<per_offset<float>> && offset_differentiable_bias<per_offset<double>>);

namespace {
// Fill entry (h, index) with 100 h + index, so every read names the entry it came from.
template <class Scalar>
void label_entries(per_offset<Scalar>& bias) {
  for (index_t h = 0; h < bias.num_heads(); ++h)
    for (index_t k = 0; k < bias.entries(); ++k) bias.table()(h, k) = Scalar(100 * h + k);
}
}  // namespace

// Expected indices written out from the definition (REFERENCES.md §2): delta = i - j (textbook
// Xiao & Zhu, u_{i-j}), clipped as in Shaw et al. 2018 clip(x, k) = max(-k, min(k, x)).
TEST_CASE("per_offset: bidirectional entry clamp(i - j, -K, K) + K", "[per_offset]") {
  per_offset<double> bias{2, masking::bidirectional, 2};
  CHECK(bias.num_heads() == 2);
  CHECK(bias.clip() == 2);
  CHECK(bias.mode() == masking::bidirectional);
  REQUIRE(bias.entries() == 5);
  REQUIRE(bias.parameters().size() == 10);
  CHECK(bias.parameters().isZero());  // zero until reset_parameters
  label_entries(bias);
  // delta -5 .. 5 -> entries 0 0 0 0 1 2 3 4 4 4 4
  const std::vector<double> expected{0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4};
  for (index_t delta = -5; delta <= 5; ++delta) {
    INFO("delta " << delta);
    CHECK(bias.at_offset(0, delta) == expected[std::size_t(delta + 5)]);
    CHECK(bias.at_offset(1, delta) == 100 + expected[std::size_t(delta + 5)]);
    CHECK(bias(1, 20 + delta, 20) == 100 + expected[std::size_t(delta + 5)]);
  }
  CHECK(bias(0, 10, 10) == 2);        // delta 0 -> entry K
  CHECK(bias(0, 11, 10) == 3);        // key one step in the past
  CHECK(bias(0, 10, 11) == 1);        // key one step in the future (Shaw's j - i = +1)
  CHECK(bias(1, 1000000, 0) == 104);  // clipped at +K
  CHECK(bias(1, 0, 1000000) == 100);  // clipped at -K
  for (index_t i = 0; i < 20; ++i)
    for (index_t j = 0; j < 20; ++j) CHECK(bias(1, i, j) == bias(1, i + 50, j + 50));  // shift invariance
}

TEST_CASE("per_offset: causal entry clamp(i - j, 0, K); future keys share entry 0", "[per_offset]") {
  per_offset<float> bias{2, masking::causal, 3};
  REQUIRE(bias.entries() == 4);
  REQUIRE(bias.parameters().size() == 8);
  label_entries(bias);
  // delta -2 .. 5 -> entries 0 0 0 1 2 3 3 3
  const std::vector<float> expected{0, 0, 0, 1, 2, 3, 3, 3};
  for (index_t delta = -2; delta <= 5; ++delta) {
    INFO("delta " << delta);
    CHECK(bias.at_offset(1, delta) == 100 + expected[std::size_t(delta + 2)]);
  }
  CHECK(bias(0, 9, 2) == 3.0f);    // delta 7 clipped to K
  CHECK(bias(0, 3, 5) == 0.0f);    // future key, masked anyway
  CHECK(bias(1, 4, 3) == 101.0f);

  per_offset<float> doc{2, masking::causal, 4};  // the doc block's example
  label_entries(doc);
  CHECK(doc(0, 9, 2) == doc.table()(0, 4));
}

TEST_CASE("per_offset: K = 0 is one shared scalar per head", "[per_offset]") {
  for (masking mode : {masking::bidirectional, masking::causal}) {
    per_offset<double> bias{3, mode, 0};
    REQUIRE(bias.entries() == 1);
    REQUIRE(bias.parameters().size() == 3);
    bias.parameters() << 0.5, -1.0, 2.5;
    for (index_t delta : {-100, -1, 0, 1, 100}) {
      CHECK(bias.at_offset(0, delta) == 0.5);
      CHECK(bias.at_offset(1, delta) == -1.0);
      CHECK(bias.at_offset(2, delta) == 2.5);
    }
    param_vector<double> grad = param_vector<double>::Zero(3);
    const std::vector<double> d_bias{1, 2, 3, 4};
    bias.accumulate_offset_gradient(1, -2, d_bias, as_span(grad));
    CHECK(grad[1] == 10);
    CHECK(grad[0] == 0);
    CHECK(grad[2] == 0);
  }
}

TEST_CASE("per_offset: parameters() is the [H][entries] table, row-major", "[per_offset]") {
  per_offset<double> bias{3, masking::bidirectional, 4};
  REQUIRE(bias.table().rows() == 3);
  REQUIRE(bias.table().cols() == 9);
  label_entries(bias);
  CHECK(bias.parameters()[2 * 9 + 7] == 207);  // element (h, index) at h * entries + index
  bias.parameters()[9 + 8] = -4.0;
  CHECK(bias.table()(1, 8) == -4.0);
  CHECK(bias(1, 50, 0) == -4.0);
  const per_offset<double>& view = bias;
  CHECK(view.parameters().data() == bias.parameters().data());
  CHECK(view.table().data() == bias.parameters().data());
  CHECK(view.table()(2, 0) == 200);
}

TEST_CASE("per_offset: gradient scatters each offset onto its clipped entry", "[per_offset]") {
  const per_offset<double> bias{2, masking::bidirectional, 1};
  param_vector<double> grad = param_vector<double>::Zero(6);
  const std::vector<double> d_bias{1, 2, 3, 4, 5};  // delta -2 .. 2 -> entries 0, 0, 1, 2, 2
  bias.accumulate_offset_gradient(1, -2, d_bias, as_span(grad));
  CHECK(grad[3] == 1 + 2);
  CHECK(grad[4] == 3);
  CHECK(grad[5] == 4 + 5);
  CHECK(grad.head(3).isZero());  // other head untouched
  bias.accumulate_offset_gradient(1, -2, d_bias, as_span(grad));  // accumulates
  CHECK(grad[5] == 18);

  const per_offset<float> causal{1, masking::causal, 2};
  param_vector<float> g = param_vector<float>::Zero(3);
  const std::vector<float> ramp{1, 2, 3, 4, 5, 6, 7};  // delta -3 .. 3 -> 0 0 0 0 1 2 2
  causal.accumulate_offset_gradient(0, -3, ramp, as_span(g));
  CHECK(g[0] == 1 + 2 + 3 + 4);
  CHECK(g[1] == 5);
  CHECK(g[2] == 6 + 7);

  // A window that lies entirely beyond the clip feeds one entry.
  param_vector<float> far = param_vector<float>::Zero(3);
  causal.accumulate_offset_gradient(0, 100, ramp, as_span(far));
  CHECK(far[2] == 28);
  CHECK(far[0] + far[1] == 0);
}

TEST_CASE("per_offset: reset_parameters draws normal(0, std), reproducibly", "[per_offset]") {
  per_offset<double> a{8, masking::bidirectional, 200}, b{8, masking::bidirectional, 200};  // 3208 draws
  a.reset_parameters(3, 0.02);
  b.reset_parameters(3, 0.02);
  CHECK(a.parameters() == b.parameters());
  const double mean = a.parameters().mean();
  const double std = std::sqrt((a.parameters().array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.002);
  CHECK(std == Approx(0.02).epsilon(0.05));
  b.reset_parameters(4, 0.02);
  CHECK(a.parameters() != b.parameters());
  b.reset_parameters(3, 0.0);
  CHECK(b.parameters().isZero());
}

TEST_CASE("per_offset: invalid arguments name the argument and the value", "[per_offset]") {
  CHECK_THROWS_WITH(per_offset<float>(2, masking::causal, -1), Catch::Contains("clip") && Catch::Contains("-1"));
  CHECK_THROWS_WITH(per_offset<float>(0, masking::causal, 4), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_WITH(per_offset<float>(4, masking::bidirectional, std::numeric_limits<index_t>::max() / 4),
                    Catch::Contains("clip=") && Catch::Contains("num_heads=4"));
  per_offset<double> bias{1, masking::causal, 2};
  CHECK_THROWS_WITH(bias.reset_parameters(1, -0.5), Catch::Contains("std") && Catch::Contains("-0.5"));
  CHECK_THROWS_AS(bias.reset_parameters(1, std::nan("")), std::invalid_argument);
}
