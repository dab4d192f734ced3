// The fused forward against the reference kernel.
#include "catch.hpp"
#include "random_tensors.hpp"
#include "user_policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/sandwich.hpp>

#include <cmath>
#include <vector>

using namespace relbias;
using relbias_test::max_relative_error;
using relbias_test::random_tensor;
using relbias_test::wave_bias;
using relbias_test::to_bhsd;

namespace {

struct case_shape {
  index_t batch = 1, lq = 5, lk = 5, hq = 2, hk = 2, dim = 8, dim_v = 8;
};

template <class S>
constexpr double tolerance() { return std::is_same_v<S, float> ? 2e-5 : 1e-12; }

/// Runs fused and reference on the same random inputs and returns the worse relative error of
/// O and of lse.
template <class Bias, class S = typename Bias::scalar_type>
double fused_vs_reference(const Bias& bias, const case_shape& c, const attention_options<S>& options,
                          detail::tile_shape tiles = {}) {
  const auto q = random_tensor<S>(c.batch, c.lq, c.hq, c.dim, 1);
  const auto k = random_tensor<S>(c.batch, c.lk, c.hk, c.dim, 2);
  const auto v = random_tensor<S>(c.batch, c.lk, c.hk, c.dim_v, 3);
  const auto expected = reference_attention(q.view(), k.view(), v.view(), bias, options);

  attention_result<S> got{tensor<S>(c.batch, c.lq, c.hq, c.dim_v), std::vector<S>(std::size_t(c.batch * c.hq * c.lq))};
  const detail::forward_problem<S> pb{q.view(), k.view(), v.view(), got.out.view(), std::span<S>(got.lse),
                                      options, options.scale_for(c.dim), c.hq / c.hk, tiles};
  const detail::batch_layout layout = detail::make_layout(options, c.batch, c.lq, c.lk);
  detail::fused_forward(pb, layout, detail::make_bias_plan(bias, detail::visited_window(layout), detail::thread_count(options.num_threads)));

  double worst = max_relative_error<S>(got.out.view(), expected.out.view());
  for (std::size_t n = 0; n < got.lse.size(); ++n) {
    if (std::isinf(expected.lse[n])) {
      if (got.lse[n] != expected.lse[n]) return INFINITY;
      continue;
    }
    worst = std::max(worst, std::abs(double(got.lse[n]) - expected.lse[n]) / std::max(std::abs(double(expected.lse[n])), 1.0));
  }
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("attention: fused matches reference across tile edges", "[attention]", float, double) {
  using S = TestType;
  const alibi<S> bias{2};
  const std::vector<index_t> lengths{1, 2, 3, 7, 15, 16, 17, 33};
  for (masking mask : {masking::bidirectional, masking::causal})
    for (index_t lq : lengths)
      for (index_t lk : {lq, index_t(1), index_t(17), index_t(33)}) {
        attention_options<S> options{.mask = mask, .q_start = lk - lq >= 0 ? lk - lq : 0};
        const case_shape c{.lq = lq, .lk = lk};
        INFO("mask=" << int(mask) << " lq=" << lq << " lk=" << lk);
        CHECK(fused_vs_reference(bias, c, options, {.rows = 4, .cols = 16}) < tolerance<S>());
      }
}

TEMPLATE_TEST_CASE("attention: fused matches reference with default tiles", "[attention]", float, double) {
  using S = TestType;
  const alibi<S> bias{2};
  const sandwich<S> sinusoid{2, 8};
  for (masking mask : {masking::bidirectional, masking::causal})
    for (index_t length : {63, 64, 65, 255, 256, 257}) {
      INFO("mask=" << int(mask) << " length=" << length);
      CHECK(fused_vs_reference(bias, {.lq = length, .lk = length}, attention_options<S>{.mask = mask}) < tolerance<S>());
      CHECK(fused_vs_reference(sinusoid, {.lq = length, .lk = length}, attention_options<S>{.mask = mask}) < tolerance<S>());
    }
}

TEMPLATE_TEST_CASE("attention: offsets, GQA, batches and policies", "[attention]", float, double) {
  using S = TestType;
  const case_shape gqa{.batch = 2, .lq = 9, .lk = 21, .hq = 4, .hk = 2, .dim = 8, .dim_v = 5};
  for (masking mask : {masking::bidirectional, masking::causal}) {
    const attention_options<S> decode{.mask = mask, .q_start = 12, .k_start = 0};
    const attention_options<S> shifted{.mask = mask, .q_start = 100, .k_start = 95};
    CHECK(fused_vs_reference(no_bias<S>{4}, gqa, decode, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(alibi<S>{4}, gqa, shifted, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(sandwich<S>{4, 8}, gqa, shifted, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(sandwich<S>{4, 16}, gqa, decode) < tolerance<S>());
    CHECK(fused_vs_reference(wave_bias<S>{4}, gqa, decode, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(wave_bias<S>{4}, {.lq = 1, .lk = 40, .hq = 4, .hk = 1}, decode) < tolerance<S>());
  }
}

TEMPLATE_TEST_CASE("attention: KERPLE and FIRE through their fast paths", "[attention]", float, double) {
  using S = TestType;
  const case_shape c{.batch = 1, .lq = 13, .lk = 29, .hq = 3, .hk = 1, .dim = 8, .dim_v = 8};
  // FIRE with L = 8: query positions 16 .. 28 lie past L (per-row normaliser); starting at 3,
  // rows 3 .. 7 share the normaliser of L (distance table) and row 8 is the tie i == L.
  const fire<S> small_threshold{3, 5, fire_config{.init_L = 8}};
  for (masking mask : {masking::bidirectional, masking::causal}) {
    INFO("mask=" << int(mask));
    for (index_t q_start : {0, 3, 16}) {
      const attention_options<S> options{.mask = mask, .q_start = q_start};
      CHECK(fused_vs_reference(kerple_power<S>{3, 7}, c, options, {.rows = 4, .cols = 8}) < tolerance<S>());
      CHECK(fused_vs_reference(kerple_log<S>{3, 7}, c, options, {.rows = 4, .cols = 8}) < tolerance<S>());
      CHECK(fused_vs_reference(small_threshold, c, options, {.rows = 4, .cols = 8}) < tolerance<S>());
      CHECK(fused_vs_reference(fire<S>{3, 5}, c, options) < tolerance<S>());
    }
  }
}

TEMPLATE_TEST_CASE("attention: decoding over a long cache fills the offset tables on two threads", "[attention]", float, double) {
  using S = TestType;
  const case_shape c{.lq = 1, .lk = 4200, .hq = 4, .hk = 4, .dim = 8, .dim_v = 8};  // 4 x 4200 offsets: a large table
  const attention_options<S> options{.mask = masking::causal, .q_start = kv_cache_q_start(c.lq, c.lk), .num_threads = 2};
  CHECK(fused_vs_reference(kerple_power<S>{4, 11}, c, options) < tolerance<S>());  // fill_offsets
  CHECK(fused_vs_reference(alibi<S>{4}, c, options) < tolerance<S>());             // at_offset per offset
  CHECK(fused_vs_reference(sandwich<S>{4, 16}, c, options) < tolerance<S>());      // its own plan (make_plan)
}

TEST_CASE("attention: rows that see no key give O = 0 and lse = -inf", "[attention]") {
  // Causal, keys start after the first queries: rows 0 and 1 (positions 0, 1) see nothing.
  const attention_options<double> options{.mask = masking::causal, .q_start = 0, .k_start = 2};
  const auto q = random_tensor<double>(1, 4, 1, 4, 1), k = random_tensor<double>(1, 3, 1, 4, 2),
             v = random_tensor<double>(1, 3, 1, 4, 3);
  const auto r = attention(q.view(), k.view(), v.view(), alibi<double>{1}, options);
  for (index_t d = 0; d < 4; ++d) {
    CHECK(r.out(0, 0, 0, d) == 0.0);
    CHECK(r.out(0, 1, 0, d) == 0.0);
    CHECK(r.out(0, 2, 0, d) == v(0, 0, 0, d));  // position 2 sees only key 2
  }
  CHECK(std::isinf(r.lse[0]));
  CHECK(r.lse[0] < 0);
  CHECK(std::isfinite(r.lse[2]));
  CHECK(fused_vs_reference(alibi<double>{1}, {.lq = 4, .lk = 3, .hq = 1, .hk = 1, .dim = 4, .dim_v = 4}, options,
                           {.rows = 2, .cols = 2}) < 1e-12);
}

TEMPLATE_TEST_CASE("attention: strided [batch, heads, seq, dim] input matches contiguous", "[attention]", float, double) {
  using S = TestType;
  const index_t B = 2, L = 37, H = 3, D = 16;
  const auto q = random_tensor<S>(B, L, H, D, 7), k = random_tensor<S>(B, L, H, D, 8), v = random_tensor<S>(B, L, H, D, 9);
  auto qs = to_bhsd(q), ks = to_bhsd(k), vs = to_bhsd(v);
  std::vector<S> os(std::size_t(q.size()));
  const attention_options<S> options{.mask = masking::causal};
  attention<alibi<S>>(bhsd<const S>(qs.data(), B, H, L, D), bhsd<const S>(ks.data(), B, H, L, D),
                      bhsd<const S>(vs.data(), B, H, L, D), alibi<S>{H}, options, bhsd(os.data(), B, H, L, D));
  const auto expected = reference_attention(q.view(), k.view(), v.view(), alibi<S>{H}, options);
  CHECK(max_relative_error<S>(bhsd<const S>(os.data(), B, H, L, D), expected.out.view()) < tolerance<S>());
}

TEST_CASE("attention: bad input names the argument and the shapes", "[attention]") {
  const auto q = random_tensor<float>(1, 4, 2, 8, 1), k = random_tensor<float>(1, 5, 2, 8, 2), v = random_tensor<float>(1, 5, 2, 8, 3);
  const auto k_bad = random_tensor<float>(1, 5, 2, 7, 2);
  CHECK_THROWS_WITH(attention(q.view(), k_bad.view(), v.view(), alibi<float>{2}), Catch::Contains("k") && Catch::Contains("[1, 5, 2, 7]"));
  CHECK_THROWS_WITH(attention(q.view(), k.view(), v.view(), alibi<float>{3}), Catch::Contains("bias.num_heads() (3)"));
  tensor<float> o(1, 4, 2, 8);
  std::vector<float> lse(3);
  CHECK_THROWS_WITH(attention(q.view(), k.view(), v.view(), alibi<float>{2}, {}, o.view(), std::span<float>(lse)),
                    Catch::Contains("lse") && Catch::Contains("8"));
}
