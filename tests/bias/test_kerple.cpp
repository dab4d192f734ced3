#include "catch.hpp"
#include "../gradient_check.hpp"

#include <relbias/bias/kerple.hpp>
#include <relbias/detail/random.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

using namespace relbias;
using namespace relbias_test;

static_assert(offset_differentiable_bias<kerple_power<float>> && offset_differentiable_bias<kerple_log<double>>);
static_assert(kerple_power<float>::is_learned && kerple_log<double>::is_shift_invariant);

namespace {

// Offsets of the golden tables (REFERENCES.md §4): 0, 1, 2, 7, 100, 10^5.
constexpr index_t golden_offsets[] = {0, 1, 2, 7, 100, 100000};

// Expected biases written out from the published definitions with mpmath at 40 digits:
//   power  -r1 * d^r2            (Chi et al. 2022; layers.py: -bias_a * diff.pow(bias_p))
//   log    -r1 * log(1 + r2 d)   (Chi et al. 2022; layers.py: -bias_p * log(1 + bias_a * diff))
// e.g. python3 -c "from mpmath import *; mp.dps=40; print(-mpf(0.75)*power(7, mpf(1.5)))".
struct golden_head {
  double r1, r2;
  double bias[6];
};
constexpr golden_head power_golden[] = {
    {0.75, 1.5, {0.0, -0.75, -2.1213203435596425732, -13.8901943830891006, -750.0, -23717082.45126284499}},
    {1.25, 0.25, {0.0, -1.25, -1.4865088937534013334, -2.033220702122232179, -3.952847075210474165, -22.228492625486535015}},
};
constexpr golden_head log_golden[] = {
    {1.75, 0.625,
     {0.0, -0.84963867761797641365, -1.4191278783785753369, -2.9430775045240213666, -7.2643198353226304364, -19.325141212293864906}},
    {0.375, 0.046875,
     {0.0, -0.017178576011735326188, -0.033604559508632674732, -0.10641306492399172438, -0.65185154410390080131,
      -3.1698254928223799478}},
};

template <class Policy, class Scalar = typename Policy::scalar_type>
Policy from_golden(const golden_head (&heads)[2]) {
  const std::vector<Scalar> r1{Scalar(heads[0].r1), Scalar(heads[1].r1)}, r2{Scalar(heads[0].r2), Scalar(heads[1].r2)};
  return Policy(r1, r2);
}

template <class Policy>
void check_golden(const golden_head (&heads)[2], double relative) {
  const Policy bias = from_golden<Policy>(heads);
  for (index_t h = 0; h < 2; ++h)
    for (std::size_t n = 0; n < std::size(golden_offsets); ++n) {
      const index_t d = golden_offsets[n];
      const double expected = heads[h].bias[n];
      INFO("head " << h << ", distance " << d);
      CHECK(double(bias.at_offset(h, d)) == Approx(expected).epsilon(relative));
      CHECK(double(bias.at_offset(h, -d)) == Approx(expected).epsilon(relative));  // |i - j|
      CHECK(double(bias(h, d + 3, 3)) == Approx(expected).epsilon(relative));
    }
}

// Loss = sum_h sum_k w[h][k] * bias(h, delta_lo + k), with fixed pseudo-random weights.
struct offset_loss {
  index_t delta_lo;
  std::vector<std::vector<double>> w;  // (H, offsets)

  offset_loss(index_t heads, index_t lo, index_t hi, std::uint64_t seed) : delta_lo(lo), w(std::size_t(heads)) {
    detail::random_stream rng(seed);
    for (auto& row : w)
      for (index_t delta = lo; delta <= hi; ++delta) row.push_back(rng.uniform(-1, 1));
  }

  template <class Policy>
  double operator()(const Policy& p) const {
    double sum = 0;
    for (std::size_t h = 0; h < w.size(); ++h)
      for (std::size_t k = 0; k < w[h].size(); ++k) sum += w[h][k] * p.at_offset(index_t(h), delta_lo + index_t(k));
    return sum;
  }

  template <class Policy>
  param_vector<double> analytic(const Policy& p) const {
    param_vector<double> grad = param_vector<double>::Zero(p.parameters().size());
    for (std::size_t h = 0; h < w.size(); ++h)
      p.accumulate_offset_gradient(index_t(h), delta_lo, w[h], std::span<double>(grad.data(), std::size_t(grad.size())));
    return grad;
  }
};

}  // namespace

TEST_CASE("kerple: golden values of both kernels at offsets 0 .. 10^5", "[kerple]") {
  check_golden<kerple_power<double>>(power_golden, 4 * DBL_EPSILON);
  check_golden<kerple_log<double>>(log_golden, 4 * DBL_EPSILON);
  // float: every r1, r2 above is exact in binary, so only pow / log1p and one product round
  check_golden<kerple_power<float>>(power_golden, 4 * FLT_EPSILON);
  check_golden<kerple_log<float>>(log_golden, 4 * FLT_EPSILON);
}

TEST_CASE("kerple: the documented examples hold", "[kerple]") {
  const double r1[] = {0.5}, r2[] = {2.0};
  const kerple_power<double> power{r1, r2};
  CHECK(power(0, 5, 2) == -4.5);
  const double s1[] = {2.0}, s2[] = {1.0};
  const kerple_log<double> log{s1, s2};
  CHECK(log(0, 4, 1) == Approx(-2.772588722239781).epsilon(1e-15));
  CHECK(power.num_heads() == 1);
}

TEST_CASE("kerple: initialisation follows the reference ranges, then projects", "[kerple]") {
  // power: bias_a (outer r1) = rand * 1, bias_p (exponent r2) = rand * 2
  const kerple_power<double> power{1000, 7};
  REQUIRE(power.parameters().size() == 2000);
  CHECK(power.r1().minCoeff() == 0.01);  // some draws fall below eps = 1e-2 and are clamped
  CHECK(power.r1().maxCoeff() < 1.0);
  CHECK(power.r1().maxCoeff() > 0.95);
  CHECK(power.r2().minCoeff() >= 0.01);
  CHECK(power.r2().maxCoeff() < 2.0);
  CHECK(power.r2().maxCoeff() > 1.9);
  // log: bias_p (outer r1) = rand * 2, bias_a (inner r2) = rand * 1 -- the naming trap
  const kerple_log<double> log{1000, 7};
  CHECK(log.r1().minCoeff() >= 0.01);
  CHECK(log.r1().maxCoeff() < 2.0);
  CHECK(log.r1().maxCoeff() > 1.9);
  CHECK(log.r2().minCoeff() == 0.01);
  CHECK(log.r2().maxCoeff() < 1.0);
  CHECK(log.r2().maxCoeff() > 0.95);
  // means of U(0, 1) and U(0, 2) over 1000 draws
  CHECK(power.r1().mean() == Approx(0.5).margin(0.05));
  CHECK(power.r2().mean() == Approx(1.0).margin(0.1));
  CHECK(log.r1().mean() == Approx(1.0).margin(0.1));
}

TEST_CASE("kerple: the seed decides the parameters, on float and double alike", "[kerple]") {
  const kerple_power<double> a{8, 3}, b{8, 3}, c{8, 4};
  CHECK(a.parameters() == b.parameters());
  CHECK(a.parameters() != c.parameters());
  const kerple_log<float> f{8, 3};
  const kerple_log<double> d{8, 3};
  CHECK(f.parameters() == d.parameters().cast<float>());
  const kerple_power<float> default_seed{4};
  CHECK(default_seed.parameters() == kerple_power<float>(4, 0).parameters());
}

TEST_CASE("kerple: project() clamps as the reference does after a step", "[kerple]") {
  kerple_power<double> power{4, 1};
  power.r1() << -1.0, 0.005, 0.5, 3.0;
  power.r2() << 3.0, 0.0, 1.5, -2.0;
  power.project();
  CHECK(power.r1() == (param_vector<double>(4) << 0.01, 0.01, 0.5, 3.0).finished());
  CHECK(power.r2() == (param_vector<double>(4) << 2.0, 0.01, 1.5, 0.01).finished());

  kerple_log<float> log{3, 1};
  log.r1() << -1.0f, 5.0f, 0.25f;
  log.r2() << 3.0f, 0.001f, 100.0f;  // no upper bound for the log kernel
  log.project();
  CHECK(log.r1() == (param_vector<float>(3) << 0.01f, 5.0f, 0.25f).finished());
  CHECK(log.r2() == (param_vector<float>(3) << 3.0f, 0.01f, 100.0f).finished());
  CHECK(kerple_log<float>::projection_eps == 0.01f);

  power.r1()[0] = std::nan("");  // torch.clamp keeps NaN
  power.project();
  CHECK(std::isnan(power.r1()[0]));
}

TEST_CASE("kerple: invalid constructions name the argument, head and value", "[kerple]") {
  using V = std::vector<double>;
  CHECK_THROWS_WITH(kerple_power<float>(0), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_WITH(kerple_log<double>(-3), Catch::Contains("kerple_log") && Catch::Contains("-3"));
  CHECK_THROWS_WITH(kerple_power<double>(V{1.0, -0.5}, V{1.0, 1.0}),
                    Catch::Contains("kerple_power") && Catch::Contains("r1 of head 1") && Catch::Contains("-0.5"));
  CHECK_THROWS_WITH(kerple_power<double>(V{1.0}, V{2.5}),
                    Catch::Contains("r2 of head 0") && Catch::Contains("(0, 2]") && Catch::Contains("2.5"));
  CHECK_THROWS_WITH(kerple_power<double>(V{1.0}, V{0.0}), Catch::Contains("r2 of head 0"));
  CHECK_THROWS_WITH(kerple_log<double>(V{1.0, 1.0}, V{0.5, 0.0}), Catch::Contains("r2 of head 1") && Catch::Contains("got 0"));
  CHECK_THROWS_WITH(kerple_log<double>(V{0.0}, V{0.5}), Catch::Contains("r1 of head 0"));
  CHECK_THROWS_WITH(kerple_log<double>(V{std::nan("")}, V{0.5}), Catch::Contains("r1") && Catch::Contains("nan"));
  CHECK_THROWS_WITH(kerple_log<double>(V{1.0}, V{std::numeric_limits<double>::infinity()}),
                    Catch::Contains("r2") && Catch::Contains("inf"));
  CHECK_THROWS_WITH(kerple_power<double>(V{1.0, 2.0}, V{1.0}),
                    Catch::Contains("r1.size()=2") && Catch::Contains("r2.size()=1"));
  CHECK_THROWS_WITH(kerple_log<double>(V{}, V{}), Catch::Contains("r1.size()=0"));
  CHECK_THROWS_AS(kerple_power<float>(std::vector<float>{1e-9f}, std::vector<float>{-1e-9f}), std::invalid_argument);
  // the boundaries the paper allows, and values below eps (stored as given)
  CHECK_NOTHROW(kerple_power<double>(V{1e-9}, V{2.0}));
  CHECK(kerple_power<double>(V{1e-9}, V{1e-3}).r2()[0] == 1e-3);
  CHECK_NOTHROW(kerple_log<double>(V{1.0}, V{1e6}));
}

TEST_CASE("kerple: shift invariance, symmetry and monotone decay", "[kerple]") {
  const kerple_power<double> power{4, 11};
  const kerple_log<float> log{4, 12};
  for (index_t h = 0; h < 4; ++h) {
    for (index_t i = 0; i < 30; ++i)
      for (index_t j = 0; j < 30; ++j) {
        CHECK(power(h, i, j) == power(h, i + 977, j + 977));
        CHECK(log(h, i, j) == log(h, i + 4096, j + 4096));
        CHECK(power(h, i, j) == power(h, j, i));
        CHECK(log(h, i, j) == log.at_offset(h, i - j));
      }
    CHECK(power.at_offset(h, 0) == 0.0);
    CHECK(log.at_offset(h, 0) == 0.0f);
    for (index_t d = 1; d < 300; ++d) {
      CHECK(power.at_offset(h, d) < power.at_offset(h, d - 1));
      CHECK(log.at_offset(h, -d) < log.at_offset(h, -(d - 1)));
    }
  }
}

TEST_CASE("kerple: offset gradients match central finite differences", "[kerple][gradient]") {
  using V = std::vector<double>;
  const kerple_power<double> power{V{0.75, 1.25, 0.3}, V{1.5, 0.25, 1.9}};
  const kerple_log<double> log{V{1.75, 0.375, 0.9}, V{0.625, 0.046875, 3.0}};
  for (auto [lo, hi] : {std::pair<index_t, index_t>{-150, 150}, {0, 40}, {-60, -3}, {5, 5}}) {
    INFO("offsets " << lo << " .. " << hi);
    const offset_loss loss(3, lo, hi, std::uint64_t(100 + lo));
    check_gradients_match(loss.analytic(power), numeric_gradient(power, loss));
    check_gradients_match(loss.analytic(log), numeric_gradient(log, loss));
  }
  // randomly initialised (projected) parameters too
  const offset_loss loss(8, -70, 90, 5);
  check_gradients_match(loss.analytic(kerple_power<double>{8, 21}), numeric_gradient(kerple_power<double>{8, 21}, loss));
  check_gradients_match(loss.analytic(kerple_log<double>{8, 22}), numeric_gradient(kerple_log<double>{8, 22}, loss));
}

TEST_CASE("kerple: gradient conventions and layout", "[kerple][gradient]") {
  using V = std::vector<double>;
  const kerple_power<double> power{V{0.75, 1.25}, V{1.5, 0.25}};
  std::vector<double> grad(4, 0.0);
  const V at_zero{1.0};
  power.accumulate_offset_gradient(1, 0, at_zero, grad);
  // d = 0: b = -r1 * 0^r2 = 0 for every r2 > 0, and PyTorch's pow backward gives the exponent 0
  // (not 0 * log 0 = NaN)
  CHECK(grad == V{0.0, 0.0, 0.0, 0.0});

  // d = 2 on head 1 only touches r1[1] (index 1) and r2[1] (index 3)
  const V at_two{0.5};
  power.accumulate_offset_gradient(1, -2, at_two, grad);
  CHECK(grad[0] == 0.0);
  CHECK(grad[2] == 0.0);
  CHECK(grad[1] == Approx(-0.5 * std::pow(2.0, 0.25)).epsilon(1e-15));
  CHECK(grad[3] == Approx(-0.5 * 1.25 * std::pow(2.0, 0.25) * std::log(2.0)).epsilon(1e-15));
  // accumulates rather than overwrites
  power.accumulate_offset_gradient(1, -2, at_two, grad);
  CHECK(grad[1] == Approx(-std::pow(2.0, 0.25)).epsilon(1e-15));

  const kerple_log<double> log{V{1.75}, V{0.625}};
  std::vector<double> g(2, 0.0);
  const V three{0.0, 0.0, 0.0, 2.0};  // offsets -3 .. 0: only d = 0 (weight 2) contributes
  log.accumulate_offset_gradient(0, -3, three, g);
  CHECK(g == V{0.0, 0.0});
  const V one{1.0};
  log.accumulate_offset_gradient(0, 4, one, g);  // d = 4: -ln(1 + 2.5), -1.75 * 4 / 3.5
  CHECK(g[0] == Approx(-std::log(3.5)).epsilon(1e-15));
  CHECK(g[1] == Approx(-2.0).epsilon(1e-15));
}

TEST_CASE("kerple: float gradients agree with double", "[kerple][gradient]") {
  const kerple_power<float> pf{4, 9};
  const kerple_power<double> pd{4, 9};
  std::vector<float> d_bias_f;
  std::vector<double> d_bias_d;
  detail::random_stream rng(1);
  for (int k = 0; k < 201; ++k) {
    d_bias_d.push_back(rng.uniform(-1, 1));
    d_bias_f.push_back(float(d_bias_d.back()));
  }
  std::vector<float> gf(8, 0.0f);
  std::vector<double> gd(8, 0.0);
  for (index_t h = 0; h < 4; ++h) {
    pf.accumulate_offset_gradient(h, -100, d_bias_f, gf);
    pd.accumulate_offset_gradient(h, -100, d_bias_d, gd);
  }
  for (std::size_t k = 0; k < 8; ++k) CHECK(double(gf[k]) == Approx(gd[k]).epsilon(1e-4).margin(1e-4));
}

TEMPLATE_TEST_CASE("kerple: fill_offsets tabulates at_offset over a window", "[kerple]", float, double) {
  using S = TestType;
  const double ulps = std::is_same_v<S, float> ? 8 * FLT_EPSILON : 8 * DBL_EPSILON;
  const index_t max_offset = 37, count = 40 + 70000;  // offsets 37 down to -70002, through 0
  std::vector<S> table(static_cast<std::size_t>(count));
  // Packet log1p, float pow through double exp(r2 log d): within a few ulps of at_offset.
  auto check = [&](const auto& policy) {
    for (index_t h = 0; h < policy.num_heads(); ++h) {
      INFO("head " << h);
      policy.fill_offsets(h, max_offset, table);
      double worst = 0;
      for (index_t t = 0; t < count; ++t) {
        const double expected = policy.at_offset(h, max_offset - t);
        worst = std::max(worst, std::abs(table[std::size_t(t)] - expected) / std::max(std::abs(expected), 1e-300));
      }
      CHECK(worst <= ulps);
      CHECK(table[std::size_t(max_offset)] == 0);  // offset 0
    }
  };
  check(kerple_power<S>{4, 5});
  check(kerple_log<S>{4, 6});
}
