#include "catch.hpp"

#include <relbias/bias/t5.hpp>

#include <utility>
#include <vector>

using namespace relbias;

namespace {
using golden = std::vector<std::pair<index_t, index_t>>;  // (HF relative_position = j - i, bucket)

void check_buckets(bool bidirectional, index_t num_buckets, index_t max_distance, const golden& expected) {
  for (const auto& [rp, bucket] : expected) {
    INFO("bidirectional=" << bidirectional << " num_buckets=" << num_buckets << " max_distance=" << max_distance
                          << " relative_position=" << rp);
    CHECK(t5_relative_position_bucket(rp, bidirectional, num_buckets, max_distance) == bucket);
  }
}
}  // namespace

// Golden values: HF transformers T5Attention._relative_position_bucket evaluated with float32
// steps and a correctly rounded logf (numpy.float32 arithmetic, math.log), REFERENCES.md §1.
TEST_CASE("t5: HF buckets, bidirectional 32/128 (T5 encoder defaults)", "[t5]") {
  check_buckets(true, 32, 128,
                {{0, 0}, {1, 17}, {-1, 1}, {-7, 7}, {7, 23}, {-8, 8}, {8, 24}, {-9, 8}, {-11, 8}, {-12, 9},
                 {-15, 9}, {-16, 10}, {16, 26}, {-23, 11}, {-32, 12}, {32, 28}, {-45, 12}, {-60, 13}, {-64, 14},
                 {64, 30}, {-90, 14}, {-91, 15}, {91, 31}, {-127, 15}, {-128, 15}, {128, 31}, {-129, 15},
                 {-1000, 15}, {1000, 31}, {-1000000, 15}, {1000000, 31}, {-(index_t(1) << 40), 15}});
}

TEST_CASE("t5: HF buckets, causal 32/128 (T5 decoder defaults)", "[t5]") {
  check_buckets(false, 32, 128,
                {{0, 0}, {1, 0}, {128, 0}, {-1, 1}, {-15, 15}, {-16, 16}, {-23, 18}, {-32, 21}, {-45, 23},
                 {-64, 26}, {-90, 29}, {-112, 30}, {-113, 31}, {-127, 31}, {-128, 31}, {-129, 31}, {-1000, 31},
                 {-(index_t(1) << 40), 31}});
}

TEST_CASE("t5: HF buckets, other configurations", "[t5]") {
  check_buckets(true, 64, 256, {{-15, 15}, {-16, 16}, {16, 48}, {-32, 20}, {-64, 24}, {-127, 27}, {-128, 28}, {-1000, 31}, {1000, 63}});
  check_buckets(false, 8, 16, {{-3, 3}, {-7, 5}, {-8, 6}, {-12, 7}, {-16, 7}, {-1000, 7}, {5, 0}});
  check_buckets(true, 40, 200, {{-9, 9}, {-11, 10}, {-16, 11}, {-64, 16}, {-200, 19}, {1000, 39}});
}

TEST_CASE("t5: float32 knife edges (REFERENCES.md §1) give HF's float32 answer", "[t5]") {
  // Exact-real value of the log branch is an integer here; float64 lands one bucket lower or higher.
  check_buckets(true, 18, 128, {{-8, 5}, {-16, 6}, {-64, 8}, {8, 14}, {16, 15}, {64, 17}});
  check_buckets(false, 72, 100, {{-60, 53}});
  check_buckets(false, 108, 128, {{-72, 72}});
}

TEST_CASE("t5: bucket properties", "[t5]") {
  for (bool bidirectional : {true, false}) {
    // Non-decreasing in distance, on the past side.
    for (index_t n = 1; n < 3000; ++n)
      CHECK(t5_relative_position_bucket(-n, bidirectional) >= t5_relative_position_bucket(-(n - 1), bidirectional));
  }
  // Bidirectional: the future mirrors the past, offset by num_buckets / 2.
  for (index_t n = 1; n < 500; ++n) CHECK(t5_relative_position_bucket(n, true) == t5_relative_position_bucket(-n, true) + 16);
  // max_distance is not where the last bucket starts.
  CHECK(t5_relative_position_bucket(-90, true) == 14);
  CHECK(t5_relative_position_bucket(-91, true) == 15);
  CHECK(t5_relative_position_bucket(-112, false) == 30);
  CHECK(t5_relative_position_bucket(-113, false) == 31);
}

TEST_CASE("t5: policy reads table[bucket(j - i)][h] and is shift invariant", "[t5]") {
  t5<double> bias{3, masking::bidirectional};
  for (index_t n = 0; n < bias.parameters().size(); ++n) bias.parameters()[n] = double(n);
  CHECK(bias.table()(26, 2) == 26 * 3 + 2);  // layout [num_buckets][H]
  CHECK(bias.bucket(-16) == 26);             // delta = i - j = -16: key 16 after the query
  CHECK(bias(2, 0, 16) == 26 * 3 + 2);
  CHECK(bias(1, 16, 0) == 10 * 3 + 1);
  for (index_t i = 0; i < 40; ++i)
    for (index_t j = 0; j < 40; ++j) CHECK(bias(1, i, j) == bias(1, i + 777, j + 777));
  const t5<float> causal{2, masking::causal};
  CHECK(causal.bucket(-5) == 0);  // future key -> bucket 0, like distance 0
  CHECK(causal.bucket(5) == 5);
}

TEST_CASE("t5: gradient scatters by bucket", "[t5]") {
  const t5<double> bias{2, masking::causal, 8, 16};
  param_vector<double> grad = param_vector<double>::Zero(bias.parameters().size());
  // offsets -1, 0, 1, ..., 8: buckets 0, 0, 1, 2, 3, 4, 4, 5, 5, 6 (causal 8/16)
  std::vector<double> d_bias{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  bias.accumulate_offset_gradient(1, -1, d_bias, std::span<double>(grad.data(), std::size_t(grad.size())));
  CHECK(grad[0 * 2 + 1] == 1 + 2);
  CHECK(grad[1 * 2 + 1] == 3);
  CHECK(grad[4 * 2 + 1] == 6 + 7);  // delta 4, 5
  CHECK(grad[5 * 2 + 1] == 8 + 9);  // delta 6, 7
  CHECK(grad[6 * 2 + 1] == 10);
  CHECK(grad.sum() == 55);
  CHECK(grad[0 * 2 + 0] == 0);       // other head untouched
}

TEST_CASE("t5: initialisation and invalid configurations", "[t5]") {
  t5<double> a{4, masking::bidirectional}, b{4, masking::bidirectional};
  a.reset_parameters(7, 512.0);
  b.reset_parameters(7, 512.0);
  CHECK(a.parameters() == b.parameters());
  t5<double> large{64, masking::bidirectional, 32, 128};
  large.reset_parameters(1, 100.0);  // std = 0.1
  const auto p = large.parameters();
  const double mean = p.mean(), std = std::sqrt((p.array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.01);
  CHECK(std == Approx(0.1).epsilon(0.05));
  CHECK_THROWS_WITH(t5<float>(0, masking::causal), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_WITH(t5<float>(2, masking::bidirectional, 3), Catch::Contains("num_buckets") && Catch::Contains("3"));
  CHECK_THROWS_WITH(t5<float>(2, masking::causal, 32, 16), Catch::Contains("max_distance=16") && Catch::Contains("16"));
  CHECK_THROWS_AS(t5_relative_position_bucket(0, true, 32, 8), std::invalid_argument);
}
