#include "catch.hpp"
#include "../gradient_check.hpp"

#include <relbias/bias/fire.hpp>
#include <relbias/detail/random.hpp>
#include <relbias/offset.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

using namespace relbias;
using namespace relbias_test;

static_assert(cell_differentiable_bias<fire<float>> && cell_differentiable_bias<fire<double>>);
static_assert(learned_bias<fire<double>> && !shift_invariant_bias<fire<float>>);

namespace {

// Small hand-set parameters (H = 2, width = 2, init_L = 512) so every value can be checked by hand:
//   hidden = relu(x), relu(0.5 - x);  head 0 = 0.25 + relu(x) + 2 relu(0.5 - x)
//                                     head 1 = -0.5 - relu(x) + 0.5 relu(0.5 - x)
//   x = log(1 + 0.25 |i - j|) / (log(1 + 0.25 max(i, L)) + 1e-6),  L = |L_multiplier| * 512
template <class S>
fire<S> hand_set(S l_multiplier = S(1)) {
  fire<S> f{2, 0, fire_config{2, 512, 1e-6}};
  f.W1() << S(1), S(-1);
  f.b1() << S(0), S(0.5);
  f.W2() << S(1), S(2), S(-1), S(0.5);
  f.b2() << S(0.25), S(-0.5);
  f.c() = S(0.25);
  f.L_multiplier() = l_multiplier;
  return f;
}

// Expected x and biases of hand_set, written out from the definition above (REFERENCES.md §5,
// the paper's listing / mcleish7 class FIRE) with mpmath at 40 digits, e.g. for (100, 93):
//   python3 -c "from mpmath import *; mp.dps=40; print(log(1+mpf(.25)*7)/(log(1+mpf(.25)*512)+mpf(1e-6)))"
struct golden_cell {
  index_t i, j;
  double x, head0, head1;
};
constexpr golden_cell golden_L512[] = {
    {100, 100, 0.0, 1.25, -0.25},  // below L: normaliser log(1 + 0.25 * 512)
    {100, 99, 0.04591607387928493236, 1.2040839261207150676, -0.31887411081892739854},
    {100, 93, 0.20815632772455219681, 1.0418436722754478032, -0.56223449158682829522},
    {100, 0, 0.67041597422183892603, 0.92041597422183892603, -1.170415974221838926},
    {100, 107, 0.20815632772455219681, 1.0418436722754478032, -0.56223449158682829522},  // key after query
    {511, 411, 0.67041597422183892603, 0.92041597422183892603, -1.170415974221838926},
    {511, 0, 0.99960062976572625889, 1.2496006297657262589, -1.4996006297657262589},
    {512, 500, 0.28525670550965895127, 0.96474329449034104873, -0.67788505826448842691},  // at L
    {512, 0, 0.99999979423078279045, 1.2499997942307827904, -1.4999997942307827904},
    {600, 599, 0.044474997228950410401, 1.2055250027710495896, -0.3167124958434256156},  // past L: log(1 + 0.25 i)
    {600, 500, 0.64937495906443826435, 0.89937495906443826435, -1.1493749590644382643},
    {600, 0, 0.99999980068885268244, 1.2499998006888526824, -1.4999998006888526824},
    {600, 700, 0.64937495906443826435, 0.89937495906443826435, -1.1493749590644382643},
    {5000, 4999, 0.031288972703730837063, 1.2187110272962691629, -0.29693345905559625559},
    {5000, 4900, 0.45684714186845696555, 0.79315285813154303445, -0.93527071280268544832},
    {5000, 0, 0.99999985978096826257, 1.2499998597809682626, -1.4999998597809682626},
};
// L_multiplier = -0.5: L = |-0.5 * 512| = 256
constexpr golden_cell golden_L256[] = {
    {100, 0, 0.7804967644044613375, 1.0304967644044613375, -1.2804967644044613375},
    {300, 200, 0.75231964882105180083, 1.0023196488210518008, -1.2523196488210518008},
    {300, 0, 0.99999976909227825462, 1.2499997690922782546, -1.4999997690922782546},
};

template <class S, std::size_t N>
void check_golden(const fire<S>& f, const golden_cell (&cells)[N], double relative) {
  for (const golden_cell& cell : cells) {
    INFO("i = " << cell.i << ", j = " << cell.j);
    CHECK(double(f.input(cell.i, cell.j)) == Approx(cell.x).epsilon(relative).margin(relative));
    CHECK(double(f(0, cell.i, cell.j)) == Approx(cell.head0).epsilon(relative));
    CHECK(double(f(1, cell.i, cell.j)) == Approx(cell.head1).epsilon(relative));
  }
}

struct weighted_cell {
  index_t h, i, j;
  double w;
};

// Loss = sum over cells of w * bias(h, i, j); cells within `margin` of a ReLU kink or with
// i == L are left out, so the central difference sees a smooth function.
struct cell_loss {
  std::vector<weighted_cell> cells;

  cell_loss(const fire<double>& f, std::uint64_t seed, double margin) {
    detail::random_stream rng(seed);
    for (index_t i : {3, 40, 200, 230, 490, 540, 700, 3000})
      for (index_t offset : {0, 1, 5, 37, 150, -3, -50}) {
        const index_t j = i - offset, h = index_t(cells.size()) % f.num_heads();
        if (j < 0 || double(i) == double(f.threshold()) || near_kink(f, f.input(i, j), margin)) continue;
        cells.push_back({h, i, j, rng.uniform(-1, 1)});
      }
  }

  static bool near_kink(const fire<double>& f, double x, double margin) {
    for (index_t k = 0; k < f.width(); ++k)
      if (std::abs(f.W1()[k] * x + f.b1()[k]) < margin) return true;
    return false;
  }

  double operator()(const fire<double>& f) const {
    double sum = 0;
    for (const weighted_cell& c : cells) sum += c.w * f(c.h, c.i, c.j);
    return sum;
  }

  param_vector<double> analytic(const fire<double>& f) const {
    param_vector<double> grad = param_vector<double>::Zero(f.parameters().size());
    for (const weighted_cell& c : cells)
      f.accumulate_gradient(c.h, c.i, c.j, c.w, std::span<double>(grad.data(), std::size_t(grad.size())));
    return grad;
  }
};

}  // namespace

TEST_CASE("fire: golden values below, at and past the threshold", "[fire]") {
  check_golden(hand_set<double>(), golden_L512, 1e-14);
  check_golden(hand_set<double>(-0.5), golden_L256, 1e-14);  // L = |L_multiplier * init_L|
  check_golden(hand_set<float>(), golden_L512, 2e-6);
  check_golden(hand_set<float>(-0.5f), golden_L256, 2e-6);
}

TEST_CASE("fire: the public pieces compose to the bias", "[fire]") {
  const fire<double> f = hand_set<double>();
  CHECK(f.threshold() == 512.0);
  CHECK(f.log_distance(7) == std::log1p(0.25 * 7));
  CHECK(f.normalizer(100) == std::log1p(0.25 * 512) + 1e-6);  // below L: max(i, L) = L
  CHECK(f.normalizer(512) == f.normalizer(0));
  CHECK(f.normalizer(600) == std::log1p(0.25 * 600) + 1e-6);  // past L: the position itself
  CHECK(f.input(600, 593) == f.log_distance(7) / f.normalizer(600));
  CHECK(f.mlp(0, 0.2) == Approx(0.25 + 0.2 + 2 * 0.3).epsilon(1e-15));
  CHECK(f.mlp(1, 0.7) == Approx(-0.5 - 0.7).epsilon(1e-15));  // second unit off past x = 0.5

  const fire<double> random{5, 3, fire_config{16, 100, 1e-6}};
  detail::random_stream rng(2);
  for (int n = 0; n < 50; ++n) {
    const double x = rng.uniform(-0.5, 1.5);
    double all[5];
    random.mlp_all_heads(x, all);
    for (index_t h = 0; h < 5; ++h) CHECK(all[h] == Approx(random.mlp(h, x)).margin(1e-13));  // same sums (contraction may differ)
  }
}

TEST_CASE("fire: default initialisation is PyTorch's Linear init with c = 0.1, L_multiplier = 1", "[fire]") {
  const fire<double> f{8};
  const double bound = 1 / std::sqrt(32.0);
  REQUIRE(f.width() == 32);
  REQUIRE(f.parameters().size() == 32 + 32 + 8 * 32 + 8 + 2);
  CHECK(f.W1().cwiseAbs().maxCoeff() <= 1.0);
  CHECK(f.W1().cwiseAbs().maxCoeff() > 0.9);
  CHECK(f.b1().cwiseAbs().maxCoeff() <= 1.0);
  CHECK(f.b1().cwiseAbs().maxCoeff() > 0.9);
  CHECK(f.W2().cwiseAbs().maxCoeff() <= bound);
  CHECK(f.W2().cwiseAbs().maxCoeff() > 0.9 * bound);
  CHECK(f.b2().cwiseAbs().maxCoeff() <= bound);
  CHECK(f.b2().cwiseAbs().maxCoeff() > 0.5 * bound);
  CHECK(f.W2().mean() == Approx(0.0).margin(0.1 * bound));
  CHECK(f.c() == 0.1);
  CHECK(f.L_multiplier() == 1.0);
  CHECK(f.init_L() == 512.0);
  CHECK(f.eps() == 1e-6);
  CHECK(f.threshold() == 512.0);

  const fire<float> g{8};
  CHECK(g.c() == 0.1f);
  CHECK(g.parameters() == f.parameters().cast<float>());
}

TEST_CASE("fire: the seed decides the parameters and reset_parameters reproduces them", "[fire]") {
  fire<double> a{4, 7}, b{4, 7};
  const fire<double> c{4, 8};
  CHECK(a.parameters() == b.parameters());
  CHECK(a.parameters() != c.parameters());
  a.c() = 3.0;
  a.L_multiplier() = -2.0;
  a.W2()(1, 1) = 100.0;
  a.reset_parameters(7);
  CHECK(a.parameters() == b.parameters());
  a.reset_parameters(8);
  CHECK(a.parameters() == c.parameters());
}

TEST_CASE("fire: the flat layout is [W1, b1, W2 (row-major), b2, c, L_multiplier]", "[fire]") {
  fire<double> f{3, 1, fire_config{4, 512, 1e-6}};
  REQUIRE(f.parameters().size() == 4 + 4 + 12 + 3 + 2);
  f.parameters().setLinSpaced(25, 0.0, 24.0);
  CHECK(f.W1() == Eigen::Vector4d(0, 1, 2, 3));
  CHECK(f.b1() == Eigen::Vector4d(4, 5, 6, 7));
  CHECK(f.W2()(0, 0) == 8.0);
  CHECK(f.W2()(0, 3) == 11.0);
  CHECK(f.W2()(1, 0) == 12.0);  // row-major: head 1 starts after head 0's 4 weights
  CHECK(f.W2()(2, 3) == 19.0);
  CHECK(f.b2() == Eigen::Vector3d(20, 21, 22));
  CHECK(f.c() == 23.0);
  CHECK(f.L_multiplier() == 24.0);
  CHECK((f.W1_index() == 0 && f.b1_index() == 4 && f.W2_index() == 8 && f.b2_index() == 20));
  CHECK((f.c_index() == 23 && f.L_multiplier_index() == 24));
  const fire<double>& cf = f;
  CHECK(cf.parameters()[23] == cf.c());
}

TEST_CASE("fire: invalid construction names the argument and the value", "[fire]") {
  CHECK_THROWS_WITH(fire<float>(0), Catch::Contains("num_heads") && Catch::Contains("0"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{0}), Catch::Contains("width") && Catch::Contains("got 0"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{-2}), Catch::Contains("width") && Catch::Contains("-2"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{32, 0.0}), Catch::Contains("init_L") && Catch::Contains("got 0"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{32, -1.5}), Catch::Contains("init_L") && Catch::Contains("-1.5"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{32, std::nan("")}), Catch::Contains("init_L") && Catch::Contains("nan"));
  CHECK_THROWS_WITH(fire<double>(4, 0, fire_config{32, std::numeric_limits<double>::infinity()}),
                    Catch::Contains("init_L") && Catch::Contains("inf"));
  CHECK_THROWS_WITH(fire<float>(4, 0, fire_config{32, 512, 0.0}), Catch::Contains("eps") && Catch::Contains("got 0"));
  CHECK_THROWS_WITH(fire<float>(4, 0, fire_config{32, 512, -1e-9}), Catch::Contains("eps") && Catch::Contains("-1e-09"));
  CHECK_NOTHROW(fire<float>(1, 0, fire_config{1, 1e-3, 1e-12}));
}

TEST_CASE("fire: depends only on |i - j| up to the threshold, not past it", "[fire]") {
  const fire<double> f = hand_set<double>();
  for (index_t h = 0; h < 2; ++h)
    for (index_t d = 0; d <= 90; ++d) {
      INFO("head " << h << ", distance " << d);
      for (index_t i : {100, 311, 511, 512}) {  // i <= L: shared normaliser psi(L) + eps
        CHECK(f(h, i, i - d) == f(h, 90, 90 - d));
        CHECK(f(h, i, i + d) == f(h, i, i - d));  // bidirectional: symmetric in i - j
      }
      CHECK(f(h, 600, 600 + d) == f(h, 600, 600 - d));
    }
  // past L the normaliser grows with i: the same distance maps to a smaller input
  for (index_t d : {1, 7, 100}) {
    CHECK(f.input(700, 700 - d) < f.input(600, 600 - d));
    CHECK(f.input(600, 600 - d) < f.input(512, 512 - d));
    CHECK(f(0, 700, 700 - d) != f(0, 600, 600 - d));
  }
  CHECK(f(0, 513, 413) != f(0, 512, 412));  // one step past L already differs
}

TEST_CASE("fire: a KV-cache query normalises by its absolute position", "[fire]") {
  const fire<double> f = hand_set<double>();
  // one new query after 999 cached tokens sits at i = 999 (bottom-right alignment)
  const index_t i = kv_cache_q_start(1, 1000);
  REQUIRE(i == 999);
  CHECK(f.normalizer(i) == std::log1p(0.25 * 999) + 1e-6);
  // mpmath from the definition with N = 999: x = log(1 + 25) / (log(1 + 249.75) + 1e-6)
  CHECK(f.input(i, 899) == Approx(0.58975864710100831852).epsilon(1e-14));
  CHECK(f(0, i, 899) == Approx(0.83975864710100831852).epsilon(1e-14));
  // restarting positions at 0 (the reference without a cache) would normalise by L instead
  CHECK(f(0, i, 899) != Approx(0.92041597422183892603).epsilon(1e-6));
  // a chunk of 4 queries at 996 .. 999: every row has its own normaliser
  const index_t q_start = kv_cache_q_start(4, 1000);
  for (index_t r = 0; r < 4; ++r)
    CHECK(f.normalizer(query_position(q_start, r)) == std::log1p(0.25 * double(996 + r)) + 1e-6);
}

TEST_CASE("fire: gradients of every parameter match central finite differences", "[fire][gradient]") {
  SECTION("default initialisation, L = 512") {
    const fire<double> f{3, 5, fire_config{8, 512, 1e-6}};
    const cell_loss loss(f, 1, 0.05);
    REQUIRE(loss.cells.size() >= 25);
    check_gradients_match(loss.analytic(f), numeric_gradient(f, loss, 1e-4));
  }
  SECTION("negative c and L_multiplier (the sign branches), L = 256") {
    fire<double> f{2, 6, fire_config{6, 512, 1e-6}};
    f.c() = -0.2;
    f.L_multiplier() = -0.5;
    const cell_loss loss(f, 2, 0.05);
    REQUIRE(loss.cells.size() >= 25);
    check_gradients_match(loss.analytic(f), numeric_gradient(f, loss, 1e-4));
  }
  SECTION("hand-set parameters, small init_L so most rows are past L") {
    fire<double> f = hand_set<double>();
    f.L_multiplier() = 0.1;  // L = 51.2
    const cell_loss loss(f, 3, 0.05);
    REQUIRE(loss.cells.size() >= 15);
    check_gradients_match(loss.analytic(f), numeric_gradient(f, loss, 1e-4));
  }
}

TEST_CASE("fire: a tie i == L gives L_multiplier half the one-sided gradient", "[fire][gradient]") {
  const fire<double> f = hand_set<double>();  // L = 512 exactly
  auto bias_at = [&](double l_multiplier) {
    fire<double> g = f;
    g.L_multiplier() = l_multiplier;
    return g(0, 512, 500);
  };
  param_vector<double> grad = param_vector<double>::Zero(f.parameters().size());
  f.accumulate_gradient(0, 512, 500, 1.0, as_span(grad));
  const double analytic = grad[f.L_multiplier_index()];
  // one-sided second-order differences: L above i moves the normaliser, L below i does not
  const double s = 1e-7;
  const double right = (-3 * bias_at(1) + 4 * bias_at(1 + s) - bias_at(1 + 2 * s)) / (2 * s);
  REQUIRE(std::abs(right) > 1e-3);
  CHECK(bias_at(1 - s) == bias_at(1));  // flat on the left: the left derivative is 0
  CHECK(bias_at(1 - 2 * s) == bias_at(1));
  CHECK(analytic == Approx(0.5 * right).epsilon(1e-6));  // torch.maximum: grad / 2 to each side
  const double central = (bias_at(1 + s) - bias_at(1 - s)) / (2 * s);  // the mean of both sides
  CHECK(analytic == Approx(central).epsilon(1e-5));
  // one position past L the threshold no longer matters; one before it takes it all
  grad.setZero();
  f.accumulate_gradient(0, 513, 501, 1.0, as_span(grad));
  CHECK(grad[f.L_multiplier_index()] == 0.0);
  grad.setZero();
  f.accumulate_gradient(0, 511, 499, 1.0, as_span(grad));
  CHECK(grad[f.L_multiplier_index()] == Approx(right).epsilon(1e-6));  // same distance, same x
}

TEST_CASE("fire: ReLU'(0) = 0, abs'(0) = 0 and db2 = g, as in PyTorch", "[fire][gradient]") {
  fire<double> f = hand_set<double>();
  param_vector<double> grad = param_vector<double>::Zero(f.parameters().size());
  // i == j: x = 0, so unit 0 sits exactly on its kink (z = 1 * 0 + 0) and gets no gradient
  const double dx = f.accumulate_mlp_gradient(0, 0.0, 0.75, as_span(grad));
  CHECK(grad[f.W1_index()] == 0.0);
  CHECK(grad[f.b1_index()] == 0.0);
  CHECK(grad[f.W2_index()] == 0.0);
  CHECK(grad[f.W2_index() + 1] == 0.75 * 0.5);    // unit 1: z = 0.5
  CHECK(grad[f.b1_index() + 1] == 0.75 * 2.0);    // g * W2[0][1]
  CHECK(grad[f.W1_index() + 1] == 0.0);           // times x = 0
  CHECK(dx == 0.75 * 2.0 * -1.0);                 // through unit 1 only
  CHECK(grad[f.b2_index()] == 0.75);
  CHECK(grad[f.b2_index() + 1] == 0.0);
  CHECK(grad.segment(f.W2_index() + 2, 2).isZero());  // head 1 untouched

  // c = 0: every |c d| is 0 and abs'(0) = 0, so c gets no gradient (x = 0 everywhere)
  f.c() = 0.0;
  grad.setZero();
  for (index_t j : {0, 10, 90}) f.accumulate_gradient(1, 100, j, 1.0, as_span(grad));
  CHECK(grad[f.c_index()] == 0.0);
  CHECK(grad[f.L_multiplier_index()] == 0.0);

  // accumulate_gradient is the composition of the two public pieces
  f.c() = 0.25;
  param_vector<double> whole = param_vector<double>::Zero(grad.size()), parts = whole;
  f.accumulate_gradient(1, 300, 217, -1.5, as_span(whole));
  const double dx2 = f.accumulate_mlp_gradient(1, f.input(300, 217), -1.5, as_span(parts));
  f.accumulate_input_gradient(300, 83, dx2, as_span(parts));
  CHECK(whole == parts);
}

TEST_CASE("fire: float gradients agree with double", "[fire][gradient]") {
  const fire<double> fd{3, 4, fire_config{8, 64, 1e-6}};
  const fire<float> ff{3, 4, fire_config{8, 64, 1e-6}};
  param_vector<double> gd = param_vector<double>::Zero(fd.parameters().size());
  param_vector<float> gf = param_vector<float>::Zero(ff.parameters().size());
  for (index_t i : {10, 50, 100, 400})
    for (index_t j : {0, 3, 9, 49, 99})
      for (index_t h = 0; h < 3; ++h) {
        fd.accumulate_gradient(h, i, j, 0.5, as_span(gd));
        ff.accumulate_gradient(h, i, j, 0.5f, std::span<float>(gf.data(), std::size_t(gf.size())));
      }
  for (index_t k = 0; k < gd.size(); ++k) CHECK(double(gf[k]) == Approx(gd[k]).epsilon(1e-4).margin(1e-4));
}

TEST_CASE("fire: the piecewise-linear MLP of the fused kernels equals the unit-by-unit MLP", "[fire]") {
  // Random weights, plus units the pieces must handle apart: W1 = 0 (constant, active or not),
  // two units with the same kink, and a kink at x = 0 (b1 = 0), where the diagonal key sits.
  fire<double> f{3, 11, fire_config{.width = 12}};
  f.W1()[0] = 0, f.b1()[0] = 0.5;
  f.W1()[1] = 0, f.b1()[1] = -0.5;
  f.W1()[2] = 2, f.b1()[2] = -1;
  f.W1()[3] = -4, f.b1()[3] = 2;  // kink 0.5, like unit 2, from the other side
  f.b1()[4] = 0;
  const detail::fire_pieces<double> pieces{f};
  std::vector<double> x;
  for (double v = -3; v <= 3; v += 1.0 / 64) x.push_back(v);  // exact grid: includes 0 and 0.5
  for (index_t k = 0; k < f.width(); ++k)
    if (f.W1()[k] != 0) x.push_back(-f.b1()[k] / f.W1()[k]);  // every kink
  x.insert(x.end(), {-1e30, 1e30});
  std::sort(x.begin(), x.end());
  for (index_t h = 0; h < 3; ++h) {
    std::vector<double> up(x.size(), 0.0), down(x.size(), 0.0);
    pieces.add_monotone(h, x.data(), index_t(x.size()), up.data());
    std::vector<double> reversed(x.rbegin(), x.rend());
    pieces.add_monotone(h, reversed.data(), index_t(x.size()), down.data());
    for (std::size_t n = 0; n < x.size(); ++n) {
      INFO("h=" << h << " x=" << x[n]);
      const double expected = f.mlp(h, x[n]);
      CHECK(up[n] == Approx(expected).epsilon(1e-12).margin(1e-12));
      CHECK(down[x.size() - 1 - n] == Approx(expected).epsilon(1e-12).margin(1e-12));
    }
  }

  // float: within a few ulps of the float MLP over the range attention uses (x in [0, 1]).
  const fire<float> g{8, 3};
  const detail::fire_pieces<float> float_pieces{g};
  std::vector<float> xf;
  for (int n = 0; n <= 1000; ++n) xf.push_back(float(n) / 1000);
  for (index_t h = 0; h < 8; ++h) {
    std::vector<float> out(xf.size(), 0.0f);
    float_pieces.add_monotone(h, xf.data(), index_t(xf.size()), out.data());
    for (std::size_t n = 0; n < xf.size(); ++n) CHECK(out[n] == Approx(g.mlp(h, xf[n])).epsilon(1e-5).margin(1e-6));
  }
}
