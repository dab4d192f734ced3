#include "catch.hpp"
#include "../gradient_check.hpp"

#include <relbias/bias/t5.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <vector>

using namespace relbias;
using namespace relbias_test;

static_assert(offset_differentiable_bias<t5<float>> && offset_differentiable_bias<t5<double>>);
static_assert(t5<float>::is_learned && t5<double>::is_shift_invariant);

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

// Golden values: HF transformers src/transformers/models/t5/modeling_t5.py,
// T5Attention._relative_position_bucket, evaluated independently in Python with HF's float32 steps
// (numpy.float32 for .float() / max_exact, / float32(math.log(max_distance / max_exact)),
// * (num_buckets - max_exact); the log as float32(math.log(x)), a correctly rounded logf;
// truncation). For every configuration below numpy's own float32 log, float64 and exact real
// arithmetic (Python decimal, 60 digits) give the same buckets (REFERENCES.md §1).
// Points: 0, +-1, +-(max_exact - 1), +-max_exact, the first distance of every log bucket and the
// distance before it, +-(max_distance - 1), +-max_distance, +-(max_distance + 1), +-1000, +-10^6, +-2^40.
TEST_CASE("t5: HF buckets, 32/128 (T5 defaults: encoder bidirectional, decoder causal)", "[t5]") {
  // bidirectional 32/128, max_exact 8; first distance of each log bucket (bucket@distance):
  //   8@8, 9@12, 10@16, 11@23, 12@32, 13@46, 14@64, 15@91
  check_buckets(true, 32, 128,
                {{0, 0}, {-1, 1}, {1, 17}, {-7, 7}, {7, 23}, {-8, 8}, {8, 24}, {-9, 8}, {9, 24}, {-11, 8}, {11, 24},
                 {-12, 9}, {12, 25}, {-15, 9}, {15, 25}, {-16, 10}, {16, 26}, {-22, 10}, {22, 26}, {-23, 11},
                 {23, 27}, {-31, 11}, {31, 27}, {-32, 12}, {32, 28}, {-45, 12}, {45, 28}, {-46, 13}, {46, 29},
                 {-63, 13}, {63, 29}, {-64, 14}, {64, 30}, {-90, 14}, {90, 30}, {-91, 15}, {91, 31}, {-127, 15},
                 {127, 31}, {-128, 15}, {128, 31}, {-129, 15}, {129, 31}, {-1000, 15}, {1000, 31}, {-1000000, 15},
                 {1000000, 31}, {-(index_t(1) << 40), 15}, {index_t(1) << 40, 31}});
  // causal 32/128, max_exact 16; first distance of each log bucket (bucket@distance):
  //   16@16, 17@19, 18@21, 19@24, 20@27, 21@31, 22@35, 23@40, 24@46, 25@52, 26@59, 27@67, 28@77, 29@87, 30@99,
  //   31@113
  check_buckets(false, 32, 128,
                {{0, 0}, {-1, 1}, {1, 0}, {-15, 15}, {15, 0}, {-16, 16}, {16, 0}, {-17, 16}, {17, 0}, {-18, 16},
                 {18, 0}, {-19, 17}, {19, 0}, {-20, 17}, {20, 0}, {-21, 18}, {21, 0}, {-23, 18}, {23, 0}, {-24, 19},
                 {24, 0}, {-26, 19}, {26, 0}, {-27, 20}, {27, 0}, {-30, 20}, {30, 0}, {-31, 21}, {31, 0}, {-34, 21},
                 {34, 0}, {-35, 22}, {35, 0}, {-39, 22}, {39, 0}, {-40, 23}, {40, 0}, {-45, 23}, {45, 0}, {-46, 24},
                 {46, 0}, {-51, 24}, {51, 0}, {-52, 25}, {52, 0}, {-58, 25}, {58, 0}, {-59, 26}, {59, 0}, {-66, 26},
                 {66, 0}, {-67, 27}, {67, 0}, {-76, 27}, {76, 0}, {-77, 28}, {77, 0}, {-86, 28}, {86, 0}, {-87, 29},
                 {87, 0}, {-98, 29}, {98, 0}, {-99, 30}, {99, 0}, {-112, 30}, {112, 0}, {-113, 31}, {113, 0},
                 {-127, 31}, {127, 0}, {-128, 31}, {128, 0}, {-129, 31}, {129, 0}, {-1000, 31}, {1000, 0},
                 {-1000000, 31}, {1000000, 0}, {-(index_t(1) << 40), 31}, {index_t(1) << 40, 0}});
}

TEST_CASE("t5: HF buckets, 64/256", "[t5]") {
  // bidirectional 64/256, max_exact 16; first distance of each log bucket (bucket@distance):
  //   16@16, 17@20, 18@23, 19@27, 20@32, 21@39, 22@46, 23@54, 24@64, 25@77, 26@91, 27@108, 28@128, 29@153, 30@182,
  //   31@216
  check_buckets(true, 64, 256,
                {{0, 0}, {-1, 1}, {1, 33}, {-15, 15}, {15, 47}, {-16, 16}, {16, 48}, {-17, 16}, {17, 48}, {-19, 16},
                 {19, 48}, {-20, 17}, {20, 49}, {-22, 17}, {22, 49}, {-23, 18}, {23, 50}, {-26, 18}, {26, 50},
                 {-27, 19}, {27, 51}, {-31, 19}, {31, 51}, {-32, 20}, {32, 52}, {-38, 20}, {38, 52}, {-39, 21},
                 {39, 53}, {-45, 21}, {45, 53}, {-46, 22}, {46, 54}, {-53, 22}, {53, 54}, {-54, 23}, {54, 55},
                 {-63, 23}, {63, 55}, {-64, 24}, {64, 56}, {-76, 24}, {76, 56}, {-77, 25}, {77, 57}, {-90, 25},
                 {90, 57}, {-91, 26}, {91, 58}, {-107, 26}, {107, 58}, {-108, 27}, {108, 59}, {-127, 27}, {127, 59},
                 {-128, 28}, {128, 60}, {-152, 28}, {152, 60}, {-153, 29}, {153, 61}, {-181, 29}, {181, 61},
                 {-182, 30}, {182, 62}, {-215, 30}, {215, 62}, {-216, 31}, {216, 63}, {-255, 31}, {255, 63},
                 {-256, 31}, {256, 63}, {-257, 31}, {257, 63}, {-1000, 31}, {1000, 63}, {-1000000, 31},
                 {1000000, 63}, {-(index_t(1) << 40), 31}, {index_t(1) << 40, 63}});
  // causal 64/256, max_exact 32; first distance of each log bucket (bucket@distance):
  //   32@32, 33@35, 34@37, 35@39, 36@42, 37@45, 38@48, 39@51, 40@54, 41@58, 42@62, 43@66, 44@70, 45@75, 46@80,
  //   47@85, 48@91, 49@97, 50@104, 51@110, 52@118, 53@126, 54@134, 55@143, 56@153, 57@163, 58@174, 59@185, 60@198,
  //   61@211, 62@225, 63@240
  check_buckets(false, 64, 256,
                {{0, 0}, {-1, 1}, {1, 0}, {-31, 31}, {31, 0}, {-32, 32}, {32, 0}, {-33, 32}, {33, 0}, {-34, 32},
                 {34, 0}, {-35, 33}, {35, 0}, {-36, 33}, {36, 0}, {-37, 34}, {37, 0}, {-38, 34}, {38, 0}, {-39, 35},
                 {39, 0}, {-41, 35}, {41, 0}, {-42, 36}, {42, 0}, {-44, 36}, {44, 0}, {-45, 37}, {45, 0}, {-47, 37},
                 {47, 0}, {-48, 38}, {48, 0}, {-50, 38}, {50, 0}, {-51, 39}, {51, 0}, {-53, 39}, {53, 0}, {-54, 40},
                 {54, 0}, {-57, 40}, {57, 0}, {-58, 41}, {58, 0}, {-61, 41}, {61, 0}, {-62, 42}, {62, 0}, {-65, 42},
                 {65, 0}, {-66, 43}, {66, 0}, {-69, 43}, {69, 0}, {-70, 44}, {70, 0}, {-74, 44}, {74, 0}, {-75, 45},
                 {75, 0}, {-79, 45}, {79, 0}, {-80, 46}, {80, 0}, {-84, 46}, {84, 0}, {-85, 47}, {85, 0}, {-90, 47},
                 {90, 0}, {-91, 48}, {91, 0}, {-96, 48}, {96, 0}, {-97, 49}, {97, 0}, {-103, 49}, {103, 0},
                 {-104, 50}, {104, 0}, {-109, 50}, {109, 0}, {-110, 51}, {110, 0}, {-117, 51}, {117, 0}, {-118, 52},
                 {118, 0}, {-125, 52}, {125, 0}, {-126, 53}, {126, 0}, {-133, 53}, {133, 0}, {-134, 54}, {134, 0},
                 {-142, 54}, {142, 0}, {-143, 55}, {143, 0}, {-152, 55}, {152, 0}, {-153, 56}, {153, 0}, {-162, 56},
                 {162, 0}, {-163, 57}, {163, 0}, {-173, 57}, {173, 0}, {-174, 58}, {174, 0}, {-184, 58}, {184, 0},
                 {-185, 59}, {185, 0}, {-197, 59}, {197, 0}, {-198, 60}, {198, 0}, {-210, 60}, {210, 0}, {-211, 61},
                 {211, 0}, {-224, 61}, {224, 0}, {-225, 62}, {225, 0}, {-239, 62}, {239, 0}, {-240, 63}, {240, 0},
                 {-255, 63}, {255, 0}, {-256, 63}, {256, 0}, {-257, 63}, {257, 0}, {-1000, 63}, {1000, 0},
                 {-1000000, 63}, {1000000, 0}, {-(index_t(1) << 40), 63}, {index_t(1) << 40, 0}});
}

TEST_CASE("t5: HF buckets, 8/16 (smallest log ranges)", "[t5]") {
  // bidirectional 8/16, max_exact 2; first distance of each log bucket (bucket@distance):
  //   2@2, 3@6
  check_buckets(true, 8, 16,
                {{0, 0}, {-1, 1}, {1, 5}, {-2, 2}, {2, 6}, {-3, 2}, {3, 6}, {-5, 2}, {5, 6}, {-6, 3}, {6, 7},
                 {-15, 3}, {15, 7}, {-16, 3}, {16, 7}, {-17, 3}, {17, 7}, {-1000, 3}, {1000, 7}, {-1000000, 3},
                 {1000000, 7}, {-(index_t(1) << 40), 3}, {index_t(1) << 40, 7}});
  // causal 8/16, max_exact 4; first distance of each log bucket (bucket@distance):
  //   4@4, 5@6, 6@8, 7@12
  check_buckets(false, 8, 16,
                {{0, 0}, {-1, 1}, {1, 0}, {-3, 3}, {3, 0}, {-4, 4}, {4, 0}, {-5, 4}, {5, 0}, {-6, 5}, {6, 0},
                 {-7, 5}, {7, 0}, {-8, 6}, {8, 0}, {-11, 6}, {11, 0}, {-12, 7}, {12, 0}, {-15, 7}, {15, 0}, {-16, 7},
                 {16, 0}, {-17, 7}, {17, 0}, {-1000, 7}, {1000, 0}, {-1000000, 7}, {1000000, 0},
                 {-(index_t(1) << 40), 7}, {index_t(1) << 40, 0}});
}

TEST_CASE("t5: HF buckets, 40/200 (span not a power of two)", "[t5]") {
  // bidirectional 40/200, max_exact 10; first distance of each log bucket (bucket@distance):
  //   10@10, 11@14, 12@19, 13@25, 14@34, 15@45, 16@61, 17@82, 18@110, 19@149
  check_buckets(true, 40, 200,
                {{0, 0}, {-1, 1}, {1, 21}, {-9, 9}, {9, 29}, {-10, 10}, {10, 30}, {-11, 10}, {11, 30}, {-13, 10},
                 {13, 30}, {-14, 11}, {14, 31}, {-18, 11}, {18, 31}, {-19, 12}, {19, 32}, {-24, 12}, {24, 32},
                 {-25, 13}, {25, 33}, {-33, 13}, {33, 33}, {-34, 14}, {34, 34}, {-44, 14}, {44, 34}, {-45, 15},
                 {45, 35}, {-60, 15}, {60, 35}, {-61, 16}, {61, 36}, {-81, 16}, {81, 36}, {-82, 17}, {82, 37},
                 {-109, 17}, {109, 37}, {-110, 18}, {110, 38}, {-148, 18}, {148, 38}, {-149, 19}, {149, 39},
                 {-199, 19}, {199, 39}, {-200, 19}, {200, 39}, {-201, 19}, {201, 39}, {-1000, 19}, {1000, 39},
                 {-1000000, 19}, {1000000, 39}, {-(index_t(1) << 40), 19}, {index_t(1) << 40, 39}});
  // causal 40/200, max_exact 20; first distance of each log bucket (bucket@distance):
  //   20@20, 21@23, 22@26, 23@29, 24@32, 25@36, 26@40, 27@45, 28@51, 29@57, 30@64, 31@71, 32@80, 33@90, 34@101,
  //   35@113, 36@127, 37@142, 38@159, 39@179
  check_buckets(false, 40, 200,
                {{0, 0}, {-1, 1}, {1, 0}, {-19, 19}, {19, 0}, {-20, 20}, {20, 0}, {-21, 20}, {21, 0}, {-22, 20},
                 {22, 0}, {-23, 21}, {23, 0}, {-25, 21}, {25, 0}, {-26, 22}, {26, 0}, {-28, 22}, {28, 0}, {-29, 23},
                 {29, 0}, {-31, 23}, {31, 0}, {-32, 24}, {32, 0}, {-35, 24}, {35, 0}, {-36, 25}, {36, 0}, {-39, 25},
                 {39, 0}, {-40, 26}, {40, 0}, {-44, 26}, {44, 0}, {-45, 27}, {45, 0}, {-50, 27}, {50, 0}, {-51, 28},
                 {51, 0}, {-56, 28}, {56, 0}, {-57, 29}, {57, 0}, {-63, 29}, {63, 0}, {-64, 30}, {64, 0}, {-70, 30},
                 {70, 0}, {-71, 31}, {71, 0}, {-79, 31}, {79, 0}, {-80, 32}, {80, 0}, {-89, 32}, {89, 0}, {-90, 33},
                 {90, 0}, {-100, 33}, {100, 0}, {-101, 34}, {101, 0}, {-112, 34}, {112, 0}, {-113, 35}, {113, 0},
                 {-126, 35}, {126, 0}, {-127, 36}, {127, 0}, {-141, 36}, {141, 0}, {-142, 37}, {142, 0}, {-158, 37},
                 {158, 0}, {-159, 38}, {159, 0}, {-178, 38}, {178, 0}, {-179, 39}, {179, 0}, {-199, 39}, {199, 0},
                 {-200, 39}, {200, 0}, {-201, 39}, {201, 0}, {-1000, 39}, {1000, 0}, {-1000000, 39}, {1000000, 0},
                 {-(index_t(1) << 40), 39}, {index_t(1) << 40, 0}});
}

TEST_CASE("t5: HF buckets, smallest and odd bucket counts", "[t5]") {
  // Same Python evaluation as above. One exact bucket per side (max_exact = 1); an odd
  // bidirectional count leaves its top bucket unused, as in HF (num_buckets //= 2).
  check_buckets(true, 4, 2, {{0, 0}, {-1, 1}, {1, 3}, {-2, 1}, {2, 3}, {-100, 1}, {100, 3}});
  check_buckets(true, 5, 3, {{0, 0}, {-1, 1}, {1, 3}, {-3, 1}, {3, 3}, {-100, 1}, {100, 3}});
  check_buckets(false, 2, 2, {{0, 0}, {-1, 1}, {1, 0}, {-2, 1}, {-100, 1}});
  check_buckets(false, 3, 10, {{0, 0}, {-1, 1}, {-2, 1}, {-9, 2}, {-10, 2}, {-100, 2}, {5, 0}});
  check_buckets(true, 6, 8, {{-1, 1}, {-2, 1}, {-3, 2}, {-8, 2}, {3, 5}, {8, 5}});
}

TEST_CASE("t5: float32 knife edges (REFERENCES.md §1) give HF's float32 answer", "[t5]") {
  // The log branch is (nearly) an integer at these distances, so the rounding of each float32
  // step decides the bucket. Values: Python as above (float32 steps, correctly rounded logf).
  // float64 would give 4, 5, 7 (13, 14, 16 on the future side) for 18/128 at 8, 16, 64.
  check_buckets(true, 18, 128,
                {{-7, 4}, {-8, 5}, {-9, 5}, {-15, 5}, {-16, 6}, {-17, 6}, {-63, 7}, {-64, 8}, {-65, 8},
                 {7, 13}, {8, 14}, {16, 15}, {63, 16}, {64, 17}});
  // float64 and exact real arithmetic: 54. numpy's float32 log (1 ulp above the correctly rounded
  // logf at 60/36) also gives 54: on this edge HF's bucket depends on PyTorch's logf.
  check_buckets(false, 72, 100, {{-59, 53}, {-60, 53}, {-61, 54}});
  // float64 and exact real arithmetic: 71.
  check_buckets(false, 108, 128, {{-71, 71}, {-72, 72}, {-73, 72}});
}

TEST_CASE("t5: published facts of the default buckets", "[t5]") {
  // max_distance (128) is not where the last bucket starts (REFERENCES.md §1, subtlety 2).
  CHECK(t5_relative_position_bucket(-90, true) == 14);
  CHECK(t5_relative_position_bucket(-91, true) == 15);
  CHECK(t5_relative_position_bucket(-112, false) == 30);
  CHECK(t5_relative_position_bucket(-113, false) == 31);
  // HF's sign: relative_position > 0 is a key after the query, the upper half of the buckets.
  CHECK(t5_relative_position_bucket(5, true) == 5 + 16);
  CHECK(t5_relative_position_bucket(-5, true) == 5);
  CHECK(t5_relative_position_bucket(5, false) == 0);
}

TEST_CASE("t5: bucket properties over a grid of configurations", "[t5]") {
  struct config {
    index_t num_buckets, max_distance;
  };
  for (const config c : {config{32, 128}, config{64, 256}, config{8, 16}, config{40, 200}, config{18, 128},
                         config{72, 100}, config{108, 128}, config{5, 3}}) {
    for (bool bidirectional : {true, false}) {
      INFO("num_buckets=" << c.num_buckets << " max_distance=" << c.max_distance << " bidirectional=" << bidirectional);
      const index_t per_side = bidirectional ? c.num_buckets / 2 : c.num_buckets;
      index_t previous = 0;
      bool monotone = true, in_range = true, mirrored = true, future_zero = true;
      for (index_t n = 0; n <= 5000; ++n) {
        const index_t past = t5_relative_position_bucket(-n, bidirectional, c.num_buckets, c.max_distance);
        const index_t future = t5_relative_position_bucket(n, bidirectional, c.num_buckets, c.max_distance);
        monotone = monotone && past >= previous;
        in_range = in_range && past >= 0 && past < per_side;
        if (bidirectional && n > 0) mirrored = mirrored && future == past + per_side;
        if (!bidirectional) future_zero = future_zero && future == 0;
        previous = past;
      }
      CHECK(monotone);     // non-decreasing in distance
      CHECK(in_range);     // the past side stays in [0, per_side)
      CHECK(mirrored);     // bidirectional: a key after the query gets the mirrored bucket + num_buckets / 2
      CHECK(future_zero);  // causal: every future key shares bucket 0
      CHECK(previous == per_side - 1);  // 5000 is past every max_distance here: the last bucket
    }
  }
}

TEST_CASE("t5: extreme offsets saturate without overflow", "[t5]") {
  // Not HF values (torch.abs overflows on the most negative int64): every such distance is far
  // beyond max_distance, so it gets the last bucket of its side. Run under UBSan to see no overflow.
  constexpr index_t lowest = std::numeric_limits<index_t>::min(), highest = std::numeric_limits<index_t>::max();
  CHECK(t5_relative_position_bucket(lowest, true) == 15);
  CHECK(t5_relative_position_bucket(highest, true) == 31);
  CHECK(t5_relative_position_bucket(lowest, false) == 31);
  CHECK(t5_relative_position_bucket(highest, false) == 0);
  const t5<float> bidirectional{1, masking::bidirectional}, causal{1, masking::causal};
  CHECK(bidirectional.bucket(highest) == 15);
  CHECK(bidirectional.bucket(lowest) == 31);
  CHECK(causal.bucket(highest) == 31);
  CHECK(causal.bucket(lowest) == 0);
}

TEST_CASE("t5: policy bucket(delta) is HF's bucket of -delta, including the saturated shortcut", "[t5]") {
  for (masking mode : {masking::bidirectional, masking::causal}) {
    for (const auto& [num_buckets, max_distance] : {std::pair<index_t, index_t>{32, 128}, {8, 16}, {18, 128}, {4, 3}}) {
      const t5<double> bias{2, mode, num_buckets, max_distance};
      CHECK(bias.num_buckets() == num_buckets);
      CHECK(bias.max_distance() == max_distance);
      CHECK(bias.mode() == mode);
      bool same = true;
      for (index_t delta = -3000; delta <= 3000; ++delta)
        same = same && bias.bucket(delta) == t5_relative_position_bucket(-delta, mode == masking::bidirectional,
                                                                         num_buckets, max_distance);
      CHECK(same);
    }
  }
  const t5<float> causal{2, masking::causal};
  CHECK(causal.bucket(-5) == 0);  // future key -> bucket 0, like distance 0
  CHECK(causal.bucket(0) == 0);
  CHECK(causal.bucket(5) == 5);
  CHECK(causal.bucket(113) == 31);
  const t5<float> encoder{2, masking::bidirectional};
  CHECK(encoder.bucket(-16) == 26);  // doc example: key 16 after the query
  CHECK(encoder.bucket(16) == 10);
  CHECK(encoder.bucket(91) == 15);
  CHECK(encoder.bucket(-91) == 31);
  CHECK(encoder.bucket(90) == 14);
}

TEST_CASE("t5: storage is HF's [num_buckets][H] weight; operator() reads table[bucket(j - i)][h]", "[t5]") {
  t5<double> bias{3, masking::bidirectional};
  CHECK(bias.num_heads() == 3);
  REQUIRE(bias.parameters().size() == 32 * 3);
  CHECK(bias.parameters().isZero());  // zero until reset_parameters
  REQUIRE(bias.table().rows() == 32);
  REQUIRE(bias.table().cols() == 3);
  for (index_t b = 0; b < 32; ++b)
    for (index_t h = 0; h < 3; ++h) bias.table()(b, h) = double(100 * b + h);
  CHECK(bias.parameters()[26 * 3 + 2] == 2602);  // element (bucket, h) at bucket * H + h
  CHECK(bias.parameters()[3] == 100);
  bias.parameters()[7 * 3 + 1] = -1.5;
  CHECK(bias.table()(7, 1) == -1.5);
  const t5<double>& view = bias;
  CHECK(view.parameters().data() == bias.parameters().data());
  CHECK(view.table().data() == bias.parameters().data());

  CHECK(bias(2, 0, 16) == 2602);  // i - j = -16: HF relative_position 16 -> bucket 26
  CHECK(bias(1, 16, 0) == 1001);  // key 16 before the query -> bucket 10
  CHECK(bias(0, 500, 0) == 1500);
  CHECK(bias(0, 0, 500) == 3100);
  CHECK(bias(1, 7, 0) == -1.5);
  CHECK(bias.at_offset(2, -16) == 2602);
  for (index_t i = 0; i < 60; ++i)
    for (index_t j = 0; j < 60; ++j)
      for (index_t h = 0; h < 3; ++h) {
        CHECK(bias(h, i, j) == bias.table()(bias.bucket(i - j), h));
        CHECK(bias(h, i, j) == bias(h, i + 777, j + 777));       // shift invariance
        CHECK(bias(h, i, j) == bias(h, i + 1000000, j + 1000000));
      }
}

TEST_CASE("t5: gradient scatters each offset onto its bucket", "[t5]") {
  const t5<double> causal{2, masking::causal, 8, 16};  // past buckets 0 1 2 3 | 4 4 | 5 5 | 6 .. | 7 from 12
  param_vector<double> grad = param_vector<double>::Zero(causal.parameters().size());
  const std::vector<double> d_bias{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // delta -1 .. 8
  causal.accumulate_offset_gradient(1, -1, d_bias, as_span(grad));
  CHECK(grad[0 * 2 + 1] == 1 + 2);  // delta -1 (future) and 0
  CHECK(grad[1 * 2 + 1] == 3);
  CHECK(grad[3 * 2 + 1] == 5);
  CHECK(grad[4 * 2 + 1] == 6 + 7);  // delta 4, 5
  CHECK(grad[5 * 2 + 1] == 8 + 9);  // delta 6, 7
  CHECK(grad[6 * 2 + 1] == 10);
  CHECK(grad[7 * 2 + 1] == 0);
  CHECK(grad.sum() == 55);
  for (index_t b = 0; b < 8; ++b) CHECK(grad[b * 2 + 0] == 0);  // other head untouched

  // Bidirectional 8/16: past side 0 1 | 2 (2..5) | 3 (6..); future side 4 + the same.
  const t5<double> encoder{3, masking::bidirectional, 8, 16};
  param_vector<double> g = param_vector<double>::Zero(24);
  std::vector<double> ramp(15);
  for (std::size_t k = 0; k < ramp.size(); ++k) ramp[k] = double(k + 1);  // delta -7 .. 7
  encoder.accumulate_offset_gradient(2, -7, ramp, as_span(g));
  const std::vector<double> expected{8, 9, 10 + 11 + 12 + 13, 14 + 15, 0, 7, 3 + 4 + 5 + 6, 1 + 2};
  for (index_t b = 0; b < 8; ++b) {
    INFO("bucket " << b);
    CHECK(g[b * 3 + 2] == expected[std::size_t(b)]);
    CHECK(g[b * 3 + 0] == 0);
    CHECK(g[b * 3 + 1] == 0);
  }
  encoder.accumulate_offset_gradient(2, -7, ramp, as_span(g));  // accumulates, as across layers
  CHECK(g[2 * 3 + 2] == 2 * 46);

  // A long window: each bucket collects one unit per offset it covers (32/128, one head).
  const t5<float> wide{1, masking::bidirectional};
  param_vector<float> gw = param_vector<float>::Zero(32);
  const std::vector<float> ones(2001, 1.0f);  // delta -1000 .. 1000
  wide.accumulate_offset_gradient(0, -1000, ones, as_span(gw));
  CHECK(gw[0] == 1);
  CHECK(gw[8] == 4);              // distances 8 .. 11 in the past
  CHECK(gw[24] == 4);             // and in the future
  CHECK(gw[15] == 1000 - 91 + 1);  // distances 91 .. 1000
  CHECK(gw[31] == 1000 - 91 + 1);
  CHECK(gw.sum() == 2001);
}

TEST_CASE("t5: reset_parameters is HF's normal(0, factor / sqrt(d_model)), reproducible", "[t5]") {
  t5<double> a{4, masking::bidirectional}, b{4, masking::bidirectional}, c{4, masking::bidirectional};
  a.reset_parameters(7, 512.0);
  b.reset_parameters(7, 512.0);
  CHECK(a.parameters() == b.parameters());
  CHECK_FALSE(a.parameters().isZero());
  b.reset_parameters(8, 512.0);
  CHECK(a.parameters() != b.parameters());
  c.reset_parameters(7, 512.0, 2.0);
  CHECK(c.parameters() == 2.0 * a.parameters());  // factor scales the same draws exactly

  t5<double> large{64, masking::bidirectional, 64, 256};  // 4096 draws
  large.reset_parameters(1, 100.0);                       // std = 0.1
  const auto p = large.parameters();
  const double mean = p.mean(), std = std::sqrt((p.array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.01);
  CHECK(std == Approx(0.1).epsilon(0.05));
  t5<float> single{8, masking::causal};
  single.reset_parameters(3, 64.0, 0.5);  // std = 0.0625
  CHECK(std::sqrt(single.parameters().array().square().mean()) == Approx(0.0625).epsilon(0.15));
}

TEST_CASE("t5: invalid arguments name the argument and the value", "[t5]") {
  CHECK_THROWS_WITH(t5<float>(0, masking::causal), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_WITH(t5<float>(-3, masking::causal), Catch::Contains("num_heads") && Catch::Contains("-3"));
  CHECK_THROWS_WITH(t5<float>(2, masking::bidirectional, 3),
                    Catch::Contains("num_buckets must be >= 4") && Catch::Contains("num_buckets=3"));
  CHECK_THROWS_WITH(t5<float>(2, masking::causal, 1),
                    Catch::Contains("num_buckets must be >= 2") && Catch::Contains("num_buckets=1"));
  CHECK_THROWS_WITH(t5<float>(2, masking::causal, -8), Catch::Contains("num_buckets=-8"));
  CHECK_THROWS_WITH(t5<float>(2, masking::causal, 32, 16),
                    Catch::Contains("max_distance") && Catch::Contains("max_exact = 16") && Catch::Contains("max_distance=16"));
  CHECK_THROWS_WITH(t5<float>(2, masking::bidirectional, 32, 8), Catch::Contains("max_distance=8"));
  CHECK_THROWS_WITH(t5<float>(index_t(1) << 40, masking::bidirectional, index_t(1) << 24, index_t(1) << 30),
                    Catch::Contains("overflows") && Catch::Contains("num_heads=1099511627776"));
  CHECK_NOTHROW(t5<float>(2, masking::causal, 32, 17));
  CHECK_NOTHROW(t5<float>(1, masking::bidirectional, 4, 2));

  CHECK_THROWS_WITH(t5_relative_position_bucket(0, true, 32, 8),
                    Catch::Contains("relbias::t5_relative_position_bucket") && Catch::Contains("max_distance=8"));
  CHECK_THROWS_WITH(t5_relative_position_bucket(0, true, 2), Catch::Contains("num_buckets=2"));
  CHECK_THROWS_AS(t5_relative_position_bucket(0, false, 32, -1), std::invalid_argument);

  t5<double> bias{2, masking::causal};
  CHECK_THROWS_WITH(bias.reset_parameters(1, 0.0), Catch::Contains("d_model") && Catch::Contains("0"));
  CHECK_THROWS_WITH(bias.reset_parameters(1, 512.0, -1.0), Catch::Contains("factor") && Catch::Contains("-1"));
  CHECK_THROWS_AS(bias.reset_parameters(1, std::nan("")), std::invalid_argument);
  CHECK(bias.parameters().isZero());  // a rejected reset leaves the table alone
}
