// The bf16 forward on AMX (detail/amx.hpp, detail/amx_forward.hpp) against the float reference
// on the widened inputs, within the bound from bf16's unit roundoff; and the dispatch, which runs
// everywhere: without AMX (or with it turned off) compute_precision::bf16 gives the fp32 path's bits.
//
// The bound (docs/storage.md): P rounded to bf16 moves each weight by a factor 1 + e, |e| <= u =
// 2^-8, while the row sum stays the float sum of the unrounded weights, so O moves by at most
// u max_j |v_jd|. A float q rounded to bf16 moves score j by at most D_j = scale u sum_d |q_d k_jd|;
// with D = max_j D_j the weights move by factors within [e^-2D, e^2D], adding (e^2D - 1) max_j |v_jd|.
// The kernel's exp is within e = forward_exp_error of exp (relative, tested): each weight by a
// factor within [1 - e, 1 + e] in both O's numerator and the row sum, adding 2e max_j |v_jd| to O
// and e to lse. Plus float rounding of both kernels (float_tolerance, as tests/test_attention.cpp).
#include "catch.hpp"
#include "amx_testing.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_half.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/t5.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace relbias;
using relbias_test::amx_or_skip;
using relbias_test::bound_check;
using relbias_test::copy_as;
using relbias_test::random_tensor;
using shape = relbias_test::amx_shape;

namespace {

constexpr double float_tolerance = 2e-5;

/// got (the bf16 forward) against the reference on the widened q, k, v, element by element
/// within the bound above. q_rounded: q was float and rounded by the kernel (qf its values).
template <class Bias>
bound_check check_against_bound(const tensor<float>& qf, const tensor<float>& kf, const tensor<float>& vf, const Bias& bias,
                                const attention_options<float>& options, const attention_result<float>& got, bool q_rounded) {
  const auto expected = reference_attention(qf.view(), kf.view(), vf.view(), bias, options);
  const detail::batch_layout layout = detail::make_layout(options, qf.view().batch, qf.view().seq, kf.view().seq);
  const double u = unit_roundoff<Eigen::bfloat16>(), e = detail::amx::forward_exp_error, scale = options.scale_for(qf.view().dim);
  const index_t group = qf.view().heads / kf.view().heads, dim = qf.view().dim, dim_v = vf.view().dim;
  bound_check result;
  for (const sequence& s : layout.sequences)
    for (index_t r = 0; r < s.q_length; ++r)
      for (index_t h = 0; h < qf.view().heads; ++h) {
        const index_t row = s.q_begin + r, i = s.q_start + r;
        const index_range visible = layout.band.visible_keys(i, s.k_start, s.k_length);
        double spread = 0;
        std::vector<double> v_max(std::size_t(dim_v), 0.0);
        for (index_t c = visible.begin; c < visible.end; ++c) {
          double sum = 0;
          for (index_t d = 0; d < dim; ++d) sum += std::abs(double(qf(s.batch, row, h, d)) * kf(s.batch, s.k_begin + c, h / group, d));
          spread = std::max(spread, q_rounded ? scale * u * sum : 0.0);
          for (index_t d = 0; d < dim_v; ++d) v_max[std::size_t(d)] = std::max(v_max[std::size_t(d)], std::abs(double(vf(s.batch, s.k_begin + c, h / group, d))));
        }
        for (index_t d = 0; d < dim_v; ++d) {
          const double error = std::abs(double(got.out(s.batch, row, h, d)) - expected.out(s.batch, row, h, d));
          const double bound = (std::expm1(2 * spread) + u + 2 * e) * v_max[std::size_t(d)] + float_tolerance;
          result.worst_ratio = std::max(result.worst_ratio, std::isnan(error) ? INFINITY : error / bound);
          result.worst_error = std::max(result.worst_error, error);
        }
        const std::size_t n = std::size_t((s.batch * qf.view().heads + h) * qf.view().seq + row);
        const double lse_error = got.lse[n] == expected.lse[n] ? 0.0 : std::abs(double(got.lse[n]) - expected.lse[n]);
        result.worst_ratio =
            std::max(result.worst_ratio, lse_error / (spread + e + float_tolerance * std::max(1.0, std::abs(double(expected.lse[n])))));
      }
  return result;
}

/// The bf16 forward of random bf16 q, k, v (q float when FloatQuery) against the bound.
template <bool FloatQuery = false, class Bias>
bound_check bf16_forward_error(const Bias& bias, const shape& c, attention_options<float> options, std::uint64_t seed = 1) {
  options.compute = compute_precision::bf16;
  const auto k = copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim, seed + 1));
  const auto v = copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim_v, seed + 2));
  const auto kf = copy_as<float>(k), vf = copy_as<float>(v);
  if constexpr (FloatQuery) {
    const auto q = random_tensor<float>(c.batch, c.lq, c.hq, c.dim, seed);
    return check_against_bound(q, kf, vf, bias, options, attention(q.view(), k.view(), v.view(), bias, options), true);
  } else {
    const auto q = copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lq, c.hq, c.dim, seed));
    return check_against_bound(copy_as<float>(q), kf, vf, bias, options, attention(q.view(), k.view(), v.view(), bias, options), false);
  }
}

bool same_bits(const attention_result<float>& a, const attention_result<float>& b) {
  return a.out.size() == b.out.size() && std::memcmp(a.out.data(), b.out.data(), sizeof(float) * std::size_t(a.out.size())) == 0 &&
         std::memcmp(a.lse.data(), b.lse.data(), sizeof(float) * a.lse.size()) == 0;
}

}  // namespace

TEST_CASE("amx: detection is cached, and set_disabled turns the path off and on", "[amx]") {
  const bool detected = detail::amx::detected();
  CHECK(detail::amx::detected() == detected);
  if (!detail::amx::compiled) CHECK_FALSE(detected);
  const bool was_disabled = detail::amx::disabled_flag().load();
  detail::amx::set_disabled(true);
  CHECK_FALSE(detail::amx::usable());
  detail::amx::set_disabled(false);
  CHECK(detail::amx::usable() == (detail::amx::compiled && detected));
  detail::amx::set_disabled(was_disabled);
  WARN("AMX on this machine: compiled in " << detail::amx::compiled << ", detected " << detected);
}

TEST_CASE("amx: the forward's exp is within forward_exp_error of exp, 0 at -inf, NaN at NaN; P is its bf16 rounding", "[amx]") {
  if (!amx_or_skip()) return;
  // One element per call: the returned sum is the exponential itself.
  const auto exp_of = [](float x) {
    std::uint16_t bits = 0;
    return detail::amx::exp_to_bf16(&x, 1, 1.0f, nullptr, 0.0f, &bits);
  };
  double worst = 0;
  for (int n = 0; n <= 200000; ++n) {
    const float x = -87.0f * float(n) / 200000;  // exp(-87) is still a normal float
    worst = std::max(worst, std::abs(double(exp_of(x)) / std::exp(double(x)) - 1));
  }
  CHECK(worst < detail::amx::forward_exp_error);
  CHECK(worst > 1e-5);  // the cubic's error, not float's: the bound in docs/storage.md is not loose by 10x
  WARN("the forward's exp: worst relative error " << worst << " (bound " << detail::amx::forward_exp_error << ")");
  CHECK(exp_of(0.0f) == 1.0f);
  CHECK(exp_of(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(exp_of(-200.0f) == 0.0f);
  CHECK(std::isnan(exp_of(std::numeric_limits<float>::quiet_NaN())));
  // 37 elements: the two-packet loop, the one-packet loop and the masked tail, with scale and a
  // bias row; P[c] is the nearest-even bf16 of the float exponential, the sum is over the
  // unrounded values.
  std::vector<float> x(37), bias(37);
  for (std::size_t c = 0; c < x.size(); ++c) {
    x[c] = -0.37f * float(c);
    bias[c] = 0.05f * float(c % 5);
  }
  for (const bool with_bias : {false, true}) {
    INFO("bias: " << with_bias);
    std::vector<std::uint16_t> p(x.size() + 1, 0xffff);
    const float sum = detail::amx::exp_to_bf16(x.data(), index_t(x.size()), 0.5f, with_bias ? bias.data() : nullptr, 1.5f, p.data());
    double expected_sum = 0;
    for (std::size_t c = 0; c < x.size(); ++c) {
      const double y = 0.5 * x[c] + (with_bias ? bias[c] : 0.0f) - 1.5;
      const float e = exp_of(float(y));
      expected_sum += e;
      CHECK(std::abs(e / std::exp(y) - 1) < detail::amx::forward_exp_error);
      CHECK(std::abs(int(p[c]) - int(detail::bf16_bits(e))) <= 1);  // e rounded from a differently rounded exponent
    }
    CHECK(p.back() == 0xffff);  // nothing written past n
    CHECK(std::abs(sum - expected_sum) <= 2 * detail::amx::forward_exp_error * expected_sum);
  }
}

TEST_CASE("amx: without AMX, compute_precision::bf16 gives the fp32 path's bits; half storage always does", "[amx]") {
  const alibi<float> bias{4};
  const auto qf = random_tensor<float>(1, 37, 4, 24, 51), kf = random_tensor<float>(1, 41, 2, 24, 52), vf = random_tensor<float>(1, 41, 2, 16, 53);
  attention_options<float> fp32{.mask = masking::causal, .q_start = 4};
  attention_options<float> bf16 = fp32;
  bf16.compute = compute_precision::bf16;
  const bool was_disabled = detail::amx::disabled_flag().load();
  detail::amx::set_disabled(true);
  {
    const auto q = copy_as<Eigen::bfloat16>(qf), k = copy_as<Eigen::bfloat16>(kf), v = copy_as<Eigen::bfloat16>(vf);
    CHECK(same_bits(attention(q.view(), k.view(), v.view(), bias, bf16), attention(q.view(), k.view(), v.view(), bias, fp32)));
    CHECK(same_bits(attention(qf.view(), k.view(), v.view(), bias, bf16), attention(qf.view(), k.view(), v.view(), bias, fp32)));
  }
  detail::amx::set_disabled(was_disabled);
  const auto q = copy_as<Eigen::half>(qf), k = copy_as<Eigen::half>(kf), v = copy_as<Eigen::half>(vf);
  CHECK(same_bits(attention(q.view(), k.view(), v.view(), bias, bf16), attention(q.view(), k.view(), v.view(), bias, fp32)));
}

TEST_CASE("amx: bf16 forward within the bound over tile edges, masks and GQA", "[amx]") {
  if (!amx_or_skip()) return;
  const no_bias<float> none{4};
  const alibi<float> alibi_bias{4};
  double worst = 0;
  for (const index_t length : {1, 15, 16, 17, 33, 64, 129, 200}) {
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      INFO("L = " << length << ", causal = " << (mask == masking::causal));
      const attention_options<float> options{.mask = mask};
      const shape mha{1, length, length, 4, 4, 64, 64}, gqa{2, length, length + 3, 4, 2, 20, 8};  // D = 20, Dv = 8: padded tiles
      const shape deep{1, length, length + 40, 4, 1, 72, 80};  // 3 chunks of depth, 5 value tiles
      for (const double ratio : {bf16_forward_error(none, mha, options).worst_ratio, bf16_forward_error(alibi_bias, gqa, options).worst_ratio,
                                 bf16_forward_error(alibi_bias, deep, options).worst_ratio}) {
        CHECK(ratio <= 1.0);
        worst = std::max(worst, ratio);
      }
    }
  }
  WARN("worst error / bound over tile edges, masks and GQA: " << worst);
  // The bound is the format's, not float's: at L = 200 the rounding of P shows.
  CHECK(bf16_forward_error(none, shape{1, 200, 200, 4, 4, 64, 64}, {}).worst_error > float_tolerance);
}

TEST_CASE("amx: several key blocks, a maximum that rises by more than the headroom, against the bound", "[amx]") {
  if (!amx_or_skip()) return;
  // 700 keys: three blocks of 256. Keys 300-519 scaled by 40 (scores some 40 above the first
  // block's), so rows first keep the first block's maximum as their reference, then redo a
  // block against its own maximum and rescale; ALiBi's rise toward the diagonal (causal) is the
  // small rise kept under the reference.
  const alibi<float> alibi_bias{4};
  const no_bias<float> none{4};
  const auto q = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 700, 4, 64, 81));
  auto k_raw = random_tensor<float>(1, 700, 2, 64, 82);
  for (index_t j = 300; j < 520; ++j)
    for (index_t h = 0; h < 2; ++h)
      for (index_t d = 0; d < 64; ++d) k_raw(0, j, h, d) *= 40.0f;
  const auto k = copy_as<Eigen::bfloat16>(k_raw);
  const auto v = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 700, 2, 48, 83));
  const auto qf = copy_as<float>(q), kf = copy_as<float>(k), vf = copy_as<float>(v);
  for (const masking mask : {masking::bidirectional, masking::causal}) {
    INFO("causal = " << (mask == masking::causal));
    attention_options<float> options{.mask = mask};
    options.compute = compute_precision::bf16;
    const double scaled = check_against_bound(qf, kf, vf, none, options, attention(q.view(), k.view(), v.view(), none, options), false).worst_ratio;
    const auto plain_k = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 700, 2, 64, 84));
    const double alibi_ratio = check_against_bound(qf, copy_as<float>(plain_k), vf, alibi_bias, options,
                                                   attention(q.view(), plain_k.view(), v.view(), alibi_bias, options), false).worst_ratio;
    CHECK(scaled <= 1.0);
    CHECK(alibi_ratio <= 1.0);
  }
}

TEST_CASE("amx: every policy family, windows, packed sequences, KV-cache offsets, float q", "[amx]") {
  if (!amx_or_skip()) return;
  t5<float> t5_bidirectional{4, masking::bidirectional, 32, 128}, t5_causal{4, masking::causal, 32, 128};
  t5_bidirectional.reset_parameters(3, 64.0);
  t5_causal.reset_parameters(4, 64.0);
  const kerple_power<float> power{4, 5};
  const kerple_log<float> log_bias{4, 6};
  const fire<float> fire_bias{4, 7};
  const shape gqa{2, 150, 170, 4, 2, 64, 64};
  for (const masking mask : {masking::bidirectional, masking::causal}) {
    INFO("causal = " << (mask == masking::causal));
    const attention_options<float> options{.mask = mask, .q_start = 20};
    CHECK(bf16_forward_error(mask == masking::causal ? t5_causal : t5_bidirectional, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_forward_error(power, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_forward_error(log_bias, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_forward_error(fire_bias, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_forward_error<true>(fire_bias, gqa, options).worst_ratio <= 1.0);  // float q, rounded to bf16
    const attention_options<float> window{.mask = mask, .sliding_window = 45};
    CHECK(bf16_forward_error(power, gqa, window).worst_ratio <= 1.0);
  }
  SECTION("packed sequences with padding rows and keys at rows that are no multiple of 32") {
    const std::vector<sequence> sequences{{0, 0, 70, 3, 90, 20, 0}, {0, 75, 40, 95, 35, 0, 0}, {1, 10, 100, 7, 120, 0, 0}};
    const attention_options<float> options{.mask = masking::causal, .sequences = sequences};
    const shape packed{2, 130, 130, 4, 2, 64, 64};
    CHECK(bf16_forward_error(log_bias, packed, options).worst_ratio <= 1.0);
    CHECK(bf16_forward_error(t5_causal, packed, options).worst_ratio <= 1.0);
    // Padding rows: O = 0, lse = -inf, as on the fp32 path.
    auto bf16 = options;
    bf16.compute = compute_precision::bf16;
    const auto q = copy_as<Eigen::bfloat16>(random_tensor<float>(2, 130, 4, 64, 61));
    const auto kv = copy_as<Eigen::bfloat16>(random_tensor<float>(2, 130, 2, 64, 62));
    const auto got = attention(q.view(), kv.view(), kv.view(), log_bias, bf16);
    CHECK(got.out(0, 72, 3, 5) == 0.0f);
    CHECK(got.lse[std::size_t(3 * 130 + 72)] == -std::numeric_limits<float>::infinity());
  }
}

TEST_CASE("amx: NaN in gives NaN out, rows that see no key are O = 0, lse = -inf, bits independent of threads", "[amx]") {
  if (!amx_or_skip()) return;
  const alibi<float> bias{2};
  const auto q = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 40, 2, 32, 71));
  auto k = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 42, 2, 32, 72));
  const auto v = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 42, 2, 32, 73));
  k(0, 41, 1, 3) = Eigen::bfloat16(std::numeric_limits<float>::quiet_NaN());
  // Causal, queries at positions 2..41, keys at 0..41: the NaN key (position 41) is seen by query position 41 only.
  attention_options<float> options{.mask = masking::causal, .q_start = 2, .compute = compute_precision::bf16};
  const auto got = attention(q.view(), k.view(), v.view(), bias, options);
  CHECK(std::isnan(got.out(0, 39, 1, 0)));
  CHECK(std::isnan(got.lse[std::size_t(1 * 40 + 39)]));
  CHECK(std::isfinite(got.out(0, 38, 1, 0)));
  CHECK(std::isfinite(got.out(0, 39, 0, 0)));

  attention_options<float> late_keys{.mask = masking::causal, .k_start = 30, .compute = compute_precision::bf16};
  const auto none_visible = attention(q.view(), k.view(), v.view(), bias, late_keys);
  CHECK(none_visible.out(0, 3, 1, 7) == 0.0f);
  CHECK(none_visible.lse[0] == -std::numeric_limits<float>::infinity());
  CHECK(std::isfinite(none_visible.out(0, 35, 0, 0)));

  const auto kv = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 300, 2, 32, 74));
  const auto q300 = copy_as<Eigen::bfloat16>(random_tensor<float>(1, 300, 2, 32, 75));
  options = {.num_threads = 1, .compute = compute_precision::bf16};
  const auto one = attention(q300.view(), kv.view(), kv.view(), bias, options);
  options.num_threads = 3;
  CHECK(same_bits(one, attention(q300.view(), kv.view(), kv.view(), bias, options)));
}
