#include "catch.hpp"

#include <relbias/bias/per_offset.hpp>

#include <vector>

using namespace relbias;

TEST_CASE("per_offset: bidirectional table indexed by clamp(i - j, -K, K) + K", "[per_offset]") {
  per_offset<double> bias{2, masking::bidirectional, 3};
  REQUIRE(bias.entries() == 7);
  REQUIRE(bias.parameters().size() == 14);
  for (index_t n = 0; n < 14; ++n) bias.parameters()[n] = double(n);  // layout [H][2K + 1]
  CHECK(bias(0, 10, 10) == 3);    // delta 0 -> entry K
  CHECK(bias(0, 12, 10) == 5);    // delta 2
  CHECK(bias(0, 10, 12) == 1);    // delta -2
  CHECK(bias(1, 100, 0) == 7 + 6);  // clipped at +K
  CHECK(bias(1, 0, 100) == 7 + 0);  // clipped at -K
  CHECK(bias.table()(1, 4) == 11);
  for (index_t i = 0; i < 20; ++i)
    for (index_t j = 0; j < 20; ++j) CHECK(bias(1, i, j) == bias(1, i + 50, j + 50));
}

TEST_CASE("per_offset: causal table indexed by clamp(i - j, 0, K); K = 0", "[per_offset]") {
  per_offset<float> bias{1, masking::causal, 4};
  REQUIRE(bias.entries() == 5);
  for (index_t n = 0; n < 5; ++n) bias.parameters()[n] = float(10 + n);
  CHECK(bias(0, 9, 2) == 14.0f);  // doc example: delta 7 clipped to K = 4
  CHECK(bias(0, 5, 3) == 12.0f);
  CHECK(bias(0, 3, 5) == 10.0f);  // future key shares entry 0
  per_offset<float> single{2, masking::bidirectional, 0};
  CHECK(single.entries() == 1);
  single.parameters()[1] = 2.5f;
  CHECK(single(1, 0, 9) == 2.5f);
  CHECK(single(1, 9, 0) == 2.5f);
}

TEST_CASE("per_offset: gradient scatters onto clipped entries", "[per_offset]") {
  const per_offset<double> bias{2, masking::bidirectional, 1};
  param_vector<double> grad = param_vector<double>::Zero(6);
  const std::vector<double> d_bias{1, 2, 3, 4, 5};  // delta -2 .. 2 -> entries 0, 0, 1, 2, 2
  bias.accumulate_offset_gradient(1, -2, d_bias, std::span<double>(grad.data(), 6));
  CHECK(grad[3] == 3);
  CHECK(grad[4] == 3);
  CHECK(grad[5] == 9);
  CHECK(grad.head(3).isZero());
}

TEST_CASE("per_offset: initialisation and invalid construction", "[per_offset]") {
  per_offset<double> a{8, masking::bidirectional, 200};
  a.reset_parameters(3, 0.02);
  const double std = std::sqrt(a.parameters().array().square().mean());
  CHECK(std == Approx(0.02).epsilon(0.05));
  CHECK_THROWS_WITH(per_offset<float>(2, masking::causal, -1), Catch::Contains("clip") && Catch::Contains("-1"));
  CHECK_THROWS_WITH(per_offset<float>(0, masking::causal, 4), Catch::Contains("num_heads") && Catch::Contains("0"));
}
