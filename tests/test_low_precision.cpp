// 16-bit storage (attention_half.hpp, detail/storage.hpp): widening against the formats'
// definitions, the forward against the float reference on the widened tensors (float rounding
// only), and against unrounded float inputs within a bound derived from the format's unit roundoff.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_half.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/t5.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

using namespace relbias;
using relbias_test::copy_as;
using relbias_test::max_relative_error;
using relbias_test::random_tensor;

namespace {

/// The value of a 16-bit pattern from the format's definition (IEEE 754 binary16; bfloat16 is
/// the top half of a binary32), written independently of Eigen.
template <class T>
float decode_bits(std::uint16_t bits) {
  if constexpr (std::same_as<T, Eigen::bfloat16>) {
    return std::bit_cast<float>(std::uint32_t(bits) << 16);
  } else {
    const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, fraction = bits & 0x3ff;
    float magnitude;
    if (exponent == 0x1f) magnitude = fraction ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    else if (exponent == 0) magnitude = std::ldexp(float(fraction), -24);  // subnormal: fraction * 2^-24
    else magnitude = std::ldexp(float(1024 + fraction), exponent - 25);    // (1 + fraction / 2^10) * 2^(e - 15)
    return sign ? -magnitude : magnitude;
  }
}

template <class T>
tensor<T> converted(const tensor<float>& from) { return copy_as<T>(from); }

template <class T>
tensor<float> widened(const tensor<T>& from) { return copy_as<float>(from); }

/// Worse relative error of O and lse (infinite lse must match exactly).
double result_error(const attention_result<float>& got, const attention_result<float>& expected) {
  double worst = max_relative_error<float>(got.out.view(), expected.out.view());
  for (std::size_t n = 0; n < got.lse.size(); ++n) {
    if (std::isinf(expected.lse[n]) || std::isinf(got.lse[n])) {
      if (got.lse[n] != expected.lse[n]) return INFINITY;
      continue;
    }
    worst = std::max(worst, std::abs(double(got.lse[n]) - expected.lse[n]) / std::max(std::abs(double(expected.lse[n])), 1.0));
  }
  return worst;
}

struct shape {
  index_t batch = 1, lq = 5, lk = 5, hq = 2, hk = 2, dim = 8, dim_v = 8;
};

/// The 16-bit kernel (q in Q, k and v in T, small tiles so that every edge is crossed) against the
/// float reference on the widened tensors: they differ by float rounding only.
template <class Q, class T, class Bias>
double storage_vs_widened_reference(const Bias& bias, const shape& c, const attention_options<float>& options,
                                    detail::tile_shape tiles, index_t streamed_rows) {
  const auto q = converted<Q>(random_tensor<float>(c.batch, c.lq, c.hq, c.dim, 1));
  const auto k = converted<T>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim, 2));
  const auto v = converted<T>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim_v, 3));
  const auto qf = widened(q), kf = widened(k), vf = widened(v);
  const auto expected = reference_attention(qf.view(), kf.view(), vf.view(), bias, options);

  attention_result<float> got{tensor<float>(c.batch, c.lq, c.hq, c.dim_v), std::vector<float>(std::size_t(c.batch * c.hq * c.lq))};
  const detail::half_forward_problem<Q, T> pb{q.view(), k.view(), v.view(), got.out.view(), std::span<float>(got.lse),
                                              options.scale_for(c.dim), c.hq / c.hk, 1, 1, tiles, streamed_rows};
  const detail::batch_layout layout = detail::make_layout(options, c.batch, c.lq, c.lk);
  const int threads = detail::thread_count(options.num_threads);
  detail::half_fused_forward(pb, layout, detail::make_bias_plan(bias, detail::visited_window(layout), threads), threads);
  return result_error(got, expected);
}

constexpr double float_tolerance = 2e-5;  // as tests/test_attention.cpp: float rounding of the two kernels

}  // namespace

TEMPLATE_TEST_CASE("storage: widening gives every 16-bit pattern its value from the format's definition", "[low_precision]",
                   Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  std::vector<T> all(65536 + 3);  // + 3: the packet loop starts misaligned and leaves a scalar tail
  for (std::size_t n = 0; n < 65536; ++n) all[n + 3] = Eigen::numext::bit_cast<T>(std::uint16_t(n));
  std::vector<float> packets(all.size()), scalar(all.size());
  detail::widen(all.data() + 3, 65536, packets.data() + 3);
  detail::widen_scalar(all.data() + 3, 65536, scalar.data() + 3);
  std::size_t mismatches = 0;
  for (std::size_t n = 0; n < 65536; ++n) {
    const float expected = decode_bits<T>(std::uint16_t(n));
    const auto same = [&](float x) { return std::isnan(expected) ? std::isnan(x) : std::bit_cast<std::uint32_t>(x) == std::bit_cast<std::uint32_t>(expected); };
    mismatches += !same(packets[n + 3]) + !same(scalar[n + 3]);
  }
  CHECK(mismatches == 0);
  CHECK(decode_bits<T>(0x3c00) == (std::same_as<T, Eigen::half> ? 1.0f : 0x1p-7f));  // the formats differ
  CHECK(detail::widening<T>::vectorized == (detail::widening<T>::size > 1 && Eigen::internal::packet_traits<T>::Vectorizable));
}

TEST_CASE("storage: unit roundoff bounds the rounding of float into each format", "[low_precision]") {
  const auto q = random_tensor<float>(1, 64, 2, 16, 7);
  for (const auto& [name, rounded, u] : {std::tuple{"half", widened(converted<Eigen::half>(q)), unit_roundoff<Eigen::half>()},
                                         std::tuple{"bfloat16", widened(converted<Eigen::bfloat16>(q)), unit_roundoff<Eigen::bfloat16>()}}) {
    INFO(name);
    double worst = 0;
    for (index_t n = 0; n < q.size(); ++n)
      if (std::abs(q.data()[n]) >= 1e-4f) worst = std::max(worst, std::abs(double(rounded.data()[n]) - q.data()[n]) / std::abs(q.data()[n]));
    CHECK(worst <= u);
    CHECK(worst > u / 2);  // 2048 random values come close to the bound: the roundoff is the format's
  }
}

TEMPLATE_TEST_CASE("attention_half: matches the float reference on the widened inputs across tile edges", "[low_precision]",
                   Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  const detail::tile_shape tiles{4, 8};
  const alibi<float> alibi_bias{4};
  const fire<float> fire_bias{4, 1};
  for (const index_t length : {1, 2, 3, 7, 8, 9, 33}) {
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      for (const int threads : {1, 4}) {  // 4: more threads than (tile, key/value head) pairs: one head per item
        for (const index_t streamed_rows : {0, 64}) {  // K and V widened into tiles, or streamed row by row
          INFO("L = " << length << ", causal = " << (mask == masking::causal) << ", threads = " << threads
                      << ", streamed rows = " << streamed_rows);
          const attention_options<float> options{.mask = mask, .num_threads = threads};
          const shape mha{1, length, length, 4, 4, 16, 8}, gqa{2, length, length + 3, 4, 2, 20, 8};  // D = 20: packet tails
          CHECK(storage_vs_widened_reference<T, T>(alibi_bias, mha, options, tiles, streamed_rows) < float_tolerance);
          CHECK(storage_vs_widened_reference<T, T>(fire_bias, gqa, options, tiles, streamed_rows) < float_tolerance);
          CHECK(storage_vs_widened_reference<float, T>(alibi_bias, gqa, options, tiles, streamed_rows) < float_tolerance);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("attention_half: decoding against a 16-bit cache, windows and packed sequences", "[low_precision]",
                   Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  t5<float> bias{4, masking::causal, 32, 128};
  bias.reset_parameters(3, 64.0);
  const index_t cached = 300;  // crosses the 256-key block
  const auto q = random_tensor<float>(1, 1, 4, 32, 11);
  const auto k = converted<T>(random_tensor<float>(1, cached, 2, 32, 12));
  const auto v = converted<T>(random_tensor<float>(1, cached, 2, 32, 13));
  const auto kf = widened(k), vf = widened(v);

  SECTION("one step at the end of the cache, float query (public entry point)") {
    const attention_options<float> options{.mask = masking::causal, .q_start = kv_cache_q_start(1, cached)};
    const auto got = attention(q.view(), k.view(), v.view(), bias, options);
    CHECK(result_error(got, reference_attention(q.view(), kf.view(), vf.view(), bias, options)) < float_tolerance);
  }
  SECTION("a sliding window and strided (bhsd) cache views") {
    std::vector<T> k_bhsd = relbias_test::to_bhsd(k), v_bhsd = relbias_test::to_bhsd(v);
    const auto k_view = bhsd(k_bhsd.data(), 1, 2, cached, 32), v_view = bhsd(v_bhsd.data(), 1, 2, cached, 32);
    const attention_options<float> options{.mask = masking::causal, .sliding_window = 100, .q_start = kv_cache_q_start(1, cached)};
    const auto got = attention(q.view(), k_view, v_view, bias, options);
    CHECK(result_error(got, reference_attention(q.view(), kf.view(), vf.view(), bias, options)) < float_tolerance);
  }
  SECTION("packed sequences with padding rows: each step sees its own keys") {
    const auto q3 = random_tensor<float>(1, 3, 4, 32, 14);
    const std::vector<sequence> sequences{{0, 0, 1, 0, 40, 39, 0}, {0, 2, 1, 40, 260, 259, 0}};  // query row 1: padding
    const attention_options<float> options{.mask = masking::causal, .sequences = sequences};
    const auto got = attention(q3.view(), k.view(), v.view(), bias, options);
    const auto expected = reference_attention(q3.view(), kf.view(), vf.view(), bias, options);
    CHECK(result_error(got, expected) < float_tolerance);
    CHECK(got.out(0, 1, 2, 5) == 0.0f);
    CHECK(got.lse[std::size_t(2 * 3 + 1)] == -std::numeric_limits<float>::infinity());
  }
}

TEMPLATE_TEST_CASE("attention_half: error against unrounded float inputs within the bound from the unit roundoff",
                   "[low_precision]", Eigen::half, Eigen::bfloat16) {
  // Rounding q and k (each element by a factor 1 + e, |e| <= u) moves score j by at most
  // D_j = scale (2u + u^2) sum_d |q_d k_jd|; with D = max_j D_j every probability moves by a
  // factor within [e^-2D, e^2D], so sum_j |p'_j - p_j| <= e^2D - 1, and rounding v adds u |v|:
  //   |O' - O|_d <= (e^2D - 1 + u) max_j |v_jd|   (+ float rounding of both kernels).
  using T = TestType;
  const float u = unit_roundoff<T>();
  const alibi<float> bias{4};
  const index_t lq = 65, lk = 300, dim = 32;
  const auto q = random_tensor<float>(1, lq, 4, dim, 21), k = random_tensor<float>(1, lk, 2, dim, 22), v = random_tensor<float>(1, lk, 2, dim, 23);
  const attention_options<float> options{.mask = masking::causal, .q_start = lk - lq};
  const auto got = attention(converted<T>(q).view(), converted<T>(k).view(), converted<T>(v).view(), bias, options);
  const auto expected = reference_attention(q.view(), k.view(), v.view(), bias, options);

  const float scale = options.scale_for(dim);
  double worst_ratio = 0, worst_error = 0;
  for (index_t r = 0; r < lq; ++r)
    for (index_t h = 0; h < 4; ++h) {
      double spread = 0;
      for (index_t j = 0; j <= r + lk - lq; ++j) {
        double sum = 0;
        for (index_t d = 0; d < dim; ++d) sum += std::abs(double(q(0, r, h, d)) * k(0, j, h / 2, d));
        spread = std::max(spread, scale * (2 * u + double(u) * u) * sum);
      }
      for (index_t d = 0; d < dim; ++d) {
        double v_max = 0;
        for (index_t j = 0; j <= r + lk - lq; ++j) v_max = std::max(v_max, std::abs(double(v(0, j, h / 2, d))));
        const double bound = (std::expm1(2 * spread) + u) * v_max + float_tolerance;
        const double error = std::abs(double(got.out(0, r, h, d)) - expected.out(0, r, h, d));
        worst_ratio = std::max(worst_ratio, error / bound);
        worst_error = std::max(worst_error, error);
      }
    }
  CHECK(worst_ratio <= 1.0);
  CHECK(worst_error > float_tolerance);  // the inputs really were rounded: the error is the format's, not float's
}

TEST_CASE("attention_half: NaN in gives NaN out, and rows that see no key are O = 0, lse = -inf", "[low_precision]") {
  const alibi<float> bias{2};
  const auto q = converted<Eigen::bfloat16>(random_tensor<float>(1, 4, 2, 8, 31));
  auto k = converted<Eigen::bfloat16>(random_tensor<float>(1, 6, 2, 8, 32));
  const auto v = converted<Eigen::bfloat16>(random_tensor<float>(1, 6, 2, 8, 33));
  k(0, 5, 1, 3) = Eigen::bfloat16(std::numeric_limits<float>::quiet_NaN());
  // Causal, queries at positions 4..7, keys at 2..7: the NaN key (row 5, position 7) is seen by query position 7 only.
  const attention_options<float> options{.mask = masking::causal, .q_start = 4, .k_start = 2};
  const auto got = attention(q.view(), k.view(), v.view(), bias, options);
  CHECK(std::isnan(got.out(0, 3, 1, 0)));  // position 7 sees key 7 (row 5) of head 1
  CHECK(std::isnan(got.lse[std::size_t(1 * 4 + 3)]));
  CHECK(std::isfinite(got.out(0, 2, 1, 0)));  // position 6 does not
  CHECK(std::isfinite(got.out(0, 3, 0, 0)));  // nor does head 0

  const attention_options<float> late_keys{.mask = masking::causal, .k_start = 10};
  const auto none_visible = attention(q.view(), k.view(), v.view(), bias, late_keys);
  CHECK(none_visible.out(0, 3, 1, 7) == 0.0f);
  CHECK(none_visible.lse[0] == -std::numeric_limits<float>::infinity());
}

TEST_CASE("attention_half: bad shapes, in the forward and the backward, throw std::invalid_argument naming the problem", "[low_precision]") {
  const alibi<float> bias{2};
  const auto q = converted<Eigen::half>(random_tensor<float>(1, 4, 2, 8, 41));
  const auto k = converted<Eigen::half>(random_tensor<float>(1, 6, 2, 8, 42));
  const auto v_short = converted<Eigen::half>(random_tensor<float>(1, 5, 2, 8, 43));
  CHECK_THROWS_WITH(attention(q.view(), k.view(), v_short.view(), bias, {}), Catch::Contains("v must have shape"));
  tensor<float> o(1, 4, 2, 4);
  CHECK_THROWS_WITH(attention(q.view(), k.view(), k.view(), bias, {}, o.view()), Catch::Contains("o must have shape"));
  tensor<float> small(1, 4, 2, 7);
  CHECK_THROWS_WITH(convert(q.view(), small.view()), Catch::Contains("same shape"));
  CHECK_THROWS_WITH(convert(q.view(), bshd<float>(nullptr, 1, 4, 2, 8)), Catch::Contains("null pointer"));

  const auto result = attention(q.view(), k.view(), k.view(), bias, {});
  tensor<float> dq(1, 4, 2, 8), dk(1, 6, 2, 8), dv(1, 6, 2, 8);
  CHECK_THROWS_WITH(attention_backward(q.view(), k.view(), k.view(), result.out.view(), result.out.view(),
                                       std::span<const float>(result.lse).first(3), bias, attention_options<float>{}, dq.view(), dk.view(),
                                       dv.view()),
                    Catch::Contains("lse must hold"));  // the 16-bit backward runs (tests/detail/test_amx_backward.cpp)
}
