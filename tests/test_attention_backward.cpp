// The fused backward against the reference backward, and its determinism.
#include "catch.hpp"
#include "random_tensors.hpp"
#include "user_policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/attention_reference_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/sandwich.hpp>
#include <relbias/bias/t5.hpp>

#include <cmath>
#include <cstring>
#include <span>
#include <vector>

using namespace relbias;
using relbias_test::learned_wave;
using relbias_test::max_relative_error;
using relbias_test::random_tensor;
using relbias_test::learned_wave;

namespace {

struct shape {
  index_t batch = 1, lq = 6, lk = 6, hq = 2, hk = 2, dim = 8, dim_v = 8;
};

template <class S>
constexpr double tolerance() { return std::is_same_v<S, float> ? 5e-5 : 1e-11; }

template <class S>
struct gradients {
  tensor<S> dq, dk, dv;
  std::vector<S> bias;
};

template <class S>
struct problem {
  tensor<S> q, k, v, d_out;
  attention_result<S> forward;
};

template <class Bias, class S = typename Bias::scalar_type>
problem<S> make_problem(const Bias& bias, const shape& c, const attention_options<S>& options) {
  problem<S> p{random_tensor<S>(c.batch, c.lq, c.hq, c.dim, 11), random_tensor<S>(c.batch, c.lk, c.hk, c.dim, 12),
               random_tensor<S>(c.batch, c.lk, c.hk, c.dim_v, 13), random_tensor<S>(c.batch, c.lq, c.hq, c.dim_v, 14), {}};
  p.forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  return p;
}

template <class Bias, class S = typename Bias::scalar_type>
gradients<S> empty_gradients(const Bias& bias, const shape& c) {
  gradients<S> g{tensor<S>(c.batch, c.lq, c.hq, c.dim), tensor<S>(c.batch, c.lk, c.hk, c.dim),
                 tensor<S>(c.batch, c.lk, c.hk, c.dim_v), {}};
  if constexpr (learned_bias<Bias>) g.bias.assign(std::size_t(bias.parameters().size()), S(0));
  return g;
}

template <class Bias, class S = typename Bias::scalar_type>
gradients<S> fused(const Bias& bias, const shape& c, const attention_options<S>& options, const problem<S>& p,
                   detail::tile_shape tiles) {
  gradients<S> g = empty_gradients(bias, c);
  detail::backward_problem<S> pb{p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                                 p.forward.lse, g.dq.view(), g.dk.view(), g.dv.view(), options,
                                 options.scale_for(c.dim), c.hq / c.hk, tiles};
  detail::run_backward(pb, bias, std::span<S>(g.bias));
  return g;
}

template <class Bias, class S = typename Bias::scalar_type>
gradients<S> reference(const Bias& bias, const shape& c, const attention_options<S>& options, const problem<S>& p) {
  gradients<S> g = empty_gradients(bias, c);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                               std::span<const S>(p.forward.lse), bias, options, g.dq.view(), g.dk.view(), g.dv.view(),
                               std::span<S>(g.bias));
  return g;
}

template <class S>
double worst_error(const gradients<S>& got, const gradients<S>& expected) {
  double worst = std::max({max_relative_error<S>(got.dq.view(), expected.dq.view()),
                           max_relative_error<S>(got.dk.view(), expected.dk.view()),
                           max_relative_error<S>(got.dv.view(), expected.dv.view())});
  for (std::size_t n = 0; n < got.bias.size(); ++n)
    worst = std::max(worst, std::abs(double(got.bias[n]) - expected.bias[n]) / std::max(std::abs(double(expected.bias[n])), 1.0));
  return worst;
}

template <class Bias, class S = typename Bias::scalar_type>
double fused_vs_reference(const Bias& bias, const shape& c, const attention_options<S>& options,
                          detail::tile_shape tiles = {.rows = 64, .cols = 128}) {
  const problem<S> p = make_problem(bias, c, options);
  return worst_error(fused(bias, c, options, p, tiles), reference(bias, c, options, p));
}

}  // namespace

TEMPLATE_TEST_CASE("attention_backward: fused matches reference across tile edges", "[backward]", float, double) {
  using S = TestType;
  const alibi<S, true> bias{2};
  for (masking mask : {masking::bidirectional, masking::causal})
    for (index_t lq : {1, 2, 3, 7, 8, 9, 17})
      for (index_t lk : {lq, index_t(1), index_t(15), index_t(17)}) {
        const attention_options<S> options{.mask = mask, .q_start = std::max<index_t>(lk - lq, 0)};
        INFO("mask=" << int(mask) << " lq=" << lq << " lk=" << lk);
        CHECK(fused_vs_reference(bias, {.lq = lq, .lk = lk}, options, {.rows = 4, .cols = 8}) < tolerance<S>());
      }
}

TEMPLATE_TEST_CASE("attention_backward: default tiles, offsets, GQA and every kind of policy", "[backward]", float, double) {
  using S = TestType;
  const shape gqa{.batch = 2, .lq = 9, .lk = 21, .hq = 4, .hk = 2, .dim = 8, .dim_v = 5};
  for (masking mask : {masking::bidirectional, masking::causal}) {
    INFO("mask=" << int(mask));
    const attention_options<S> decode{.mask = mask, .q_start = 12};
    const attention_options<S> shifted{.mask = mask, .q_start = 3, .k_start = 5};  // rows 0, 1 see nothing (causal)
    CHECK(fused_vs_reference(no_bias<S>{4}, gqa, decode, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(alibi<S>{4}, gqa, shifted, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(alibi<S, true>{4}, gqa, shifted, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(sandwich<S>{4, 8}, gqa, shifted, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(learned_wave<S>{4}, gqa, decode, {.rows = 4, .cols = 8}) < tolerance<S>());
    CHECK(fused_vs_reference(alibi<S, true>{2}, {.lq = 130, .lk = 257}, attention_options<S>{.mask = mask}) < tolerance<S>());
    CHECK(fused_vs_reference(sandwich<S>{2, 16}, {.lq = 130, .lk = 257}, attention_options<S>{.mask = mask}) < tolerance<S>());
  }
}

TEMPLATE_TEST_CASE("attention_backward: every learned policy matches the reference", "[backward]", float, double) {
  using S = TestType;
  const shape c{.batch = 1, .lq = 13, .lk = 29, .hq = 4, .hk = 2, .dim = 8, .dim_v = 8};
  // FIRE with L = 8: starting at q_start 3, rows 3..7 use the distance table, row 8 is the tie
  // i == L (PyTorch's 1/2 split), rows 9.. the per-row normaliser; q_start 16 is all past L.
  const fire<S> small_threshold{4, 5, fire_config{.width = 20, .init_L = 8}};
  for (masking mask : {masking::bidirectional, masking::causal}) {
    t5<S> t5_bias{4, mask, 8, 16};
    t5_bias.reset_parameters(1, 2.0);
    per_offset<S> offsets{4, mask, 5};
    offsets.reset_parameters(2, 0.5);
    for (index_t q_start : {0, 3, 16}) {
      INFO("mask=" << int(mask) << " q_start=" << q_start);
      const attention_options<S> options{.mask = mask, .q_start = q_start};
      const detail::tile_shape tiles{.rows = 4, .cols = 8};
      CHECK(fused_vs_reference(t5_bias, c, options, tiles) < tolerance<S>());
      CHECK(fused_vs_reference(offsets, c, options, tiles) < tolerance<S>());
      CHECK(fused_vs_reference(kerple_power<S>{4, 3}, c, options, tiles) < tolerance<S>());
      CHECK(fused_vs_reference(kerple_log<S>{4, 3}, c, options, tiles) < tolerance<S>());
      CHECK(fused_vs_reference(small_threshold, c, options, tiles) < tolerance<S>());
      CHECK(fused_vs_reference(fire<S>{4, 5}, c, options) < tolerance<S>());
    }
  }
}

TEMPLATE_TEST_CASE("attention_backward: FIRE past L, long rows where hidden units switch", "[backward]", float, double) {
  using S = TestType;
  // L = 16, rows 250 .. 289 all past it, 300 keys: every row crosses several kinks of the default
  // width-32 MLP, on both sides of the diagonal (the segmented backward's cuts).
  const fire<S> bias{2, 9, fire_config{.init_L = 16}};
  index_t kinks_inside = 0;
  for (index_t k = 0; k < bias.width(); ++k) {
    const double kink = -double(bias.b1()[k]) / double(bias.W1()[k]);
    kinks_inside += kink > 0.05 && kink < 0.95;
  }
  REQUIRE(kinks_inside >= 3);
  const shape c{.batch = 1, .lq = 40, .lk = 300, .hq = 2, .hk = 1, .dim = 8, .dim_v = 8};
  for (masking mask : {masking::bidirectional, masking::causal}) {
    INFO("mask=" << int(mask));
    const attention_options<S> options{.mask = mask, .q_start = 250};
    CHECK(fused_vs_reference(bias, c, options) < tolerance<S>());
    CHECK(fused_vs_reference(bias, c, options, {.rows = 8, .cols = 32}) < tolerance<S>());
  }
}

TEST_CASE("attention_backward: gradients are bit-identical run to run, and dq/dk/dv across thread counts",
          "[backward]") {
  const shape c{.batch = 2, .lq = 37, .lk = 41, .hq = 4, .hk = 2, .dim = 16, .dim_v = 16};
  const alibi<float, true> bias{4};
  attention_options<float> options{.mask = masking::causal, .num_threads = 2};
  const problem<float> p = make_problem(bias, c, options);
  const auto first = fused(bias, c, options, p, {.rows = 8, .cols = 8});
  const auto second = fused(bias, c, options, p, {.rows = 8, .cols = 8});
  options.num_threads = 1;
  const auto single = fused(bias, c, options, p, {.rows = 8, .cols = 8});
  auto same_bits = [](const auto& a, const auto& b, std::size_t count) { return std::memcmp(a, b, count * sizeof(float)) == 0; };
  CHECK(same_bits(first.dq.data(), second.dq.data(), std::size_t(first.dq.size())));
  CHECK(same_bits(first.dk.data(), second.dk.data(), std::size_t(first.dk.size())));
  CHECK(same_bits(first.dv.data(), second.dv.data(), std::size_t(first.dv.size())));
  CHECK(same_bits(first.bias.data(), second.bias.data(), first.bias.size()));
  CHECK(same_bits(first.dq.data(), single.dq.data(), std::size_t(first.dq.size())));
  CHECK(same_bits(first.dk.data(), single.dk.data(), std::size_t(first.dk.size())));
}

TEMPLATE_TEST_CASE("attention_backward: multi-query at batch 1 splits the query heads over threads", "[backward]", float,
                   double) {
  using S = TestType;
  // One key/value head and more threads than groups: slices of query heads with their own dK/dV
  // buffers (3 threads: heads {0, 3}, {1}, {2}).
  const shape c{.batch = 1, .lq = 23, .lk = 29, .hq = 4, .hk = 1, .dim = 8, .dim_v = 6};
  const alibi<S, true> bias{4};
  for (int threads : {2, 3}) {
    attention_options<S> options{.mask = masking::causal, .q_start = 6, .num_threads = threads};
    INFO("threads=" << threads);
    const problem<S> p = make_problem(bias, c, options);
    const auto first = fused(bias, c, options, p, {.rows = 8, .cols = 8});
    CHECK(worst_error(first, reference(bias, c, options, p)) < tolerance<S>());
    const auto second = fused(bias, c, options, p, {.rows = 8, .cols = 8});
    CHECK(std::memcmp(first.dk.data(), second.dk.data(), std::size_t(first.dk.size()) * sizeof(S)) == 0);
    CHECK(std::memcmp(first.dv.data(), second.dv.data(), std::size_t(first.dv.size()) * sizeof(S)) == 0);
  }
}

TEST_CASE("attention_backward: bias_grad accumulates and bad input names the argument", "[backward]") {
  const shape c{};
  const alibi<double, true> bias{2};
  const attention_options<double> options{.mask = masking::causal};
  const problem<double> p = make_problem(bias, c, options);
  auto g = empty_gradients(bias, c);
  g.bias = {1.0, 2.0};
  attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(), p.forward.lse, bias,
                     options, g.dq.view(), g.dk.view(), g.dv.view(), g.bias);
  const auto expected = reference(bias, c, options, p);
  CHECK(g.bias[0] == Approx(1.0 + expected.bias[0]).epsilon(1e-12));
  CHECK(g.bias[1] == Approx(2.0 + expected.bias[1]).epsilon(1e-12));

  std::vector<double> wrong(3);
  CHECK_THROWS_WITH(attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                                       p.forward.lse, bias, options, g.dq.view(), g.dk.view(), g.dv.view(), wrong),
                    Catch::Contains("bias_grad") && Catch::Contains("2 parameters") && Catch::Contains("got 3"));
  tensor<double> dq_wrong(1, 5, 2, 8);
  CHECK_THROWS_WITH(attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                                       p.forward.lse, bias, options, dq_wrong.view(), g.dk.view(), g.dv.view()),
                    Catch::Contains("dq") && Catch::Contains("[1, 5, 2, 8]"));
  std::vector<double> short_lse(4);
  CHECK_THROWS_WITH(attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                                       short_lse, bias, options, g.dq.view(), g.dk.view(), g.dv.view()),
                    Catch::Contains("lse") && Catch::Contains("12"));
  std::vector<double> not_wanted(2);
  CHECK_THROWS_WITH(attention_backward(p.q.view(), p.k.view(), p.v.view(), p.forward.out.view(), p.d_out.view(),
                                       p.forward.lse, alibi<double>{2}, options, g.dq.view(), g.dk.view(), g.dv.view(),
                                       not_wanted),
                    Catch::Contains("bias_grad") && Catch::Contains("0 parameters"));
}
