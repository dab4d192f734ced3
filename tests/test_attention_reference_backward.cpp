// The reference backward: every gradient (dq, dk, dv and the parameters of every learned policy)
// against central finite differences of L = sum(W o O) in double; its contract (overwrite,
// accumulate, GQA sums, layouts, rows that see no key); the softmax-invariance zeros; every error.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_reference.hpp>
#include <relbias/attention_reference_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/t5.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

using namespace relbias;
using relbias_test::random_tensor;
using relbias_test::to_bhsd;

namespace {

struct shape {
  index_t batch = 2, lq = 5, lk = 7, hq = 4, hk = 2, dim = 3, dim_v = 2;  // GQA, Lq != Lk, D != Dv
};

/// Random q, k, v and the loss weights W (shaped like O), from fixed seeds.
struct problem {
  shape s;
  tensor<double> q, k, v, weights;
  explicit problem(shape s_ = {}, std::uint64_t seed = 20)
      : s(s_), q(random_tensor<double>(s.batch, s.lq, s.hq, s.dim, seed + 1)),
        k(random_tensor<double>(s.batch, s.lk, s.hk, s.dim, seed + 2)),
        v(random_tensor<double>(s.batch, s.lk, s.hk, s.dim_v, seed + 3)),
        weights(random_tensor<double>(s.batch, s.lq, s.hq, s.dim_v, seed + 4)) {}
};

struct gradients {
  tensor<double> dq, dk, dv;
  std::vector<double> bias;  // empty for policies without parameters
};

/// L = sum(W o O): dL/dO = W, so W is the d_out of the backward.
template <class Bias>
double loss(const problem& p, const Bias& bias, const attention_options<double>& options) {
  const auto r = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  double sum = 0;
  for (index_t n = 0; n < r.out.size(); ++n) sum += r.out.data()[n] * p.weights.data()[n];
  return sum;
}

/// Runs the forward, then the backward into outputs prefilled with `fill` (bias_grad with
/// `bias_fill`, if the policy is learned).
template <class Bias>
gradients backward(const problem& p, const Bias& bias, const attention_options<double>& options, double fill = 0.0,
                   double bias_fill = 0.0) {
  const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  gradients g{tensor<double>(p.s.batch, p.s.lq, p.s.hq, p.s.dim), tensor<double>(p.s.batch, p.s.lk, p.s.hk, p.s.dim),
              tensor<double>(p.s.batch, p.s.lk, p.s.hk, p.s.dim_v), {}};
  for (tensor<double>* t : {&g.dq, &g.dk, &g.dv}) std::fill(t->data(), t->data() + t->size(), fill);
  if constexpr (learned_bias<Bias>) g.bias.assign(std::size_t(bias.parameters().size()), bias_fill);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(),
                               std::span<const double>(forward.lse), bias, options, g.dq.view(), g.dk.view(), g.dv.view(),
                               std::span<double>(g.bias));
  return g;
}

/// Central differences of f over the n values at `values` (step 1e-6, scaled by the value),
/// each against analytic[m]: |numeric - analytic| <= 1e-7 max(|numeric|, 1).
void check_against_differences(const char* name, double* values, index_t n, const double* analytic,
                               const std::function<double()>& f) {
  for (index_t m = 0; m < n; ++m) {
    const double saved = values[m], step = 1e-6 * std::max(1.0, std::abs(saved));
    values[m] = saved + step;
    const double up = f();
    values[m] = saved - step;
    const double down = f();
    values[m] = saved;
    const double numeric = (up - down) / (2 * step);
    INFO(name << "[" << m << "]: numeric " << numeric << ", analytic " << analytic[m]);
    CHECK(std::abs(numeric - analytic[m]) <= 1e-7 * std::max(1.0, std::abs(numeric)));
  }
}

double max_abs(const double* values, index_t n) {
  double worst = 0;
  for (index_t m = 0; m < n; ++m) worst = std::max(worst, std::abs(values[m]));
  return worst;
}

/// dq, dk, dv and (for learned policies) every parameter against finite differences.
template <class Bias>
void check_all_gradients(problem& p, Bias bias, const attention_options<double>& options) {
  const gradients g = backward(p, bias, options);
  // Non-trivial gradients, or agreeing with differences would prove little.
  CHECK(max_abs(g.dq.data(), g.dq.size()) > 1e-3);
  CHECK(max_abs(g.dk.data(), g.dk.size()) > 1e-3);
  CHECK(max_abs(g.dv.data(), g.dv.size()) > 1e-3);
  const auto f = [&] { return loss(p, bias, options); };
  check_against_differences("dq", p.q.data(), p.q.size(), g.dq.data(), f);
  check_against_differences("dk", p.k.data(), p.k.size(), g.dk.data(), f);
  check_against_differences("dv", p.v.data(), p.v.size(), g.dv.data(), f);
  if constexpr (learned_bias<Bias>) {
    CHECK(max_abs(g.bias.data(), index_t(g.bias.size())) > 1e-3);
    check_against_differences("bias", bias.parameters().data(), bias.parameters().size(), g.bias.data(), f);
  }
}

/// Both masks, three position offsets (the middle one straddles FIRE's L = 8.5 below), and an
/// explicit scale.
template <class MakeBias>
void check_grid(MakeBias make_bias, shape s = {}) {
  for (masking mask : {masking::bidirectional, masking::causal})
    for (auto [q_start, k_start] : {std::pair<index_t, index_t>{0, 0}, {6, 2}, {9, 4}}) {
      INFO("mask " << (mask == masking::causal ? "causal" : "bidirectional") << ", q_start " << q_start << ", k_start "
                   << k_start);
      problem p(s);
      check_all_gradients(p, make_bias(mask), attention_options<double>{.mask = mask, .q_start = q_start, .k_start = k_start});
    }
  INFO("explicit scale 0.7, causal, q_start 3");
  problem p(s, 40);
  check_all_gradients(p, make_bias(masking::causal), attention_options<double>{.mask = masking::causal, .q_start = 3, .scale = 0.7});
}

t5<double> make_t5(masking mask) {
  t5<double> bias{4, mask, 8, 16};  // max_exact 2 (bidirectional) / 4 (causal): distances up to 13 reach the log buckets
  bias.reset_parameters(5, 4.0);
  return bias;
}

per_offset<double> make_per_offset(masking mask) {
  per_offset<double> bias{4, mask, 3};  // clip 3 < the distances that occur: clipped entries collect several diagonals
  bias.reset_parameters(6, 0.5);
  return bias;
}

/// L = 8.5: no query position ties it; rows below, above and on both sides of it occur. Seed 19
/// keeps every hidden unit at least 7e-3 away from its ReLU kink (checked in the FIRE test).
fire<double> make_fire(masking = masking::causal) { return fire<double>{4, 19, fire_config{.width = 6, .init_L = 8.5}}; }

/// A learned per-cell policy defined only where causal attention looks:
///   b(h, i, j) = -theta_h log(1 + i - j)    (-inf at j = i + 1, NaN beyond)
/// A backward that hands it a masked cell gets a NaN back (0 * -inf), so it checks that the cell
/// path skips masked cells instead of passing them dS = 0.
struct causal_log_bias {
  using scalar_type = double;
  static constexpr bool is_learned = true;
  param_vector<double> theta = param_vector<double>::LinSpaced(4, 0.3, 1.2);

  index_t num_heads() const { return theta.size(); }
  double operator()(index_t h, index_t i, index_t j) const { return -theta[h] * std::log1p(double(i - j)); }
  Eigen::Map<param_vector<double>> parameters() { return {theta.data(), theta.size()}; }
  Eigen::Map<const param_vector<double>> parameters() const { return {theta.data(), theta.size()}; }
  void accumulate_gradient(index_t h, index_t i, index_t j, double d_bias, std::span<double> grad) const {
    grad[std::size_t(h)] -= d_bias * std::log1p(double(i - j));
  }
};

static_assert(cell_differentiable_bias<causal_log_bias> && !offset_differentiable_bias<causal_log_bias>);

}  // namespace

TEST_CASE("reference backward: dq, dk, dv without a bias against finite differences", "[reference_backward]") {
  check_grid([](masking) { return no_bias<double>{4}; });
}

TEST_CASE("reference backward: trainable ALiBi slopes against finite differences", "[reference_backward]") {
  check_grid([](masking) { return alibi<double, true>{4}; });
}

TEST_CASE("reference backward: T5 table against finite differences", "[reference_backward]") {
  check_grid(make_t5);
}

TEST_CASE("reference backward: per-offset table against finite differences", "[reference_backward]") {
  check_grid(make_per_offset);
}

TEST_CASE("reference backward: KERPLE power and log r1, r2 against finite differences", "[reference_backward]") {
  check_grid([](masking) { return kerple_power<double>{4, 3}; });
  check_grid([](masking) { return kerple_log<double>{4, 3}; });
}

TEST_CASE("reference backward: FIRE MLP, c and L multiplier against finite differences", "[reference_backward]") {
  const fire<double> bias = make_fire();
  // Differences are only valid away from the kinks: no query position may tie L (the max(i, L)
  // kink) and no hidden unit may sit near z = 0 (ReLU) at any input x of the positions the tests
  // use (i < 14, j < 16). A step of 1e-6 in any parameter moves z by less than 2e-5.
  REQUIRE(bias.threshold() == 8.5);
  double closest = std::numeric_limits<double>::infinity();
  index_t switching = 0;  // units active at some inputs and inactive at others
  for (index_t u = 0; u < bias.width(); ++u) {
    bool on = false, off = false;
    for (index_t i = 0; i < 14; ++i)
      for (index_t j = 0; j < 16; ++j) {
        const double z = bias.W1()[u] * bias.input(i, j) + bias.b1()[u];
        closest = std::min(closest, std::abs(z));
        (z > 0 ? on : off) = true;
      }
    switching += on && off;
  }
  REQUIRE(closest > 1e-3);
  CHECK(switching > 0);  // the ReLU gates within the grid, so its backward is exercised both ways
  check_grid(make_fire);
}

TEST_CASE("reference backward: the per-cell path never asks a policy about masked cells", "[reference_backward]") {
  for (auto [q_start, k_start] : {std::pair<index_t, index_t>{0, 0}, {6, 2}, {0, 3}}) {  // (0, 3): rows that see no key
    INFO("q_start " << q_start << ", k_start " << k_start);
    const attention_options<double> options{.mask = masking::causal, .q_start = q_start, .k_start = k_start};
    problem p;
    const gradients g = backward(p, causal_log_bias{}, options);
    CHECK(std::all_of(g.bias.begin(), g.bias.end(), [](double x) { return std::isfinite(x); }));
    check_all_gradients(p, causal_log_bias{}, options);
  }
}

TEST_CASE("reference backward: more queries than keys, single key/value head", "[reference_backward]") {
  const shape s{.batch = 1, .lq = 6, .lk = 3, .hq = 2, .hk = 1, .dim = 2, .dim_v = 3};
  check_grid([](masking) { return alibi<double, true>{2}; }, s);
  check_grid([](masking mask) {
    per_offset<double> bias{2, mask, 8};  // a smaller clip puts whole rows in one entry: zero gradient
    bias.reset_parameters(8, 0.5);
    return bias;
  }, s);
}

TEST_CASE("reference backward: a row that sees no key passes exactly zero gradient, no NaN", "[reference_backward]") {
  // Keys at 3..9, queries at 0..4 (causal): rows 0, 1, 2 see nothing.
  const attention_options<double> options{.mask = masking::causal, .q_start = 0, .k_start = 3};
  auto check_policy = [&](auto bias) {
    problem p;
    const gradients g = backward(p, bias, options);
    for (index_t b = 0; b < p.s.batch; ++b)
      for (index_t row = 0; row < p.s.lq; ++row)
        for (index_t h = 0; h < p.s.hq; ++h)
          for (index_t d = 0; d < p.s.dim; ++d) {
            if (row < 3) CHECK(g.dq(b, row, h, d) == 0.0);
            CHECK(std::isfinite(g.dq(b, row, h, d)));
          }
    for (const tensor<double>* t : {&g.dk, &g.dv})
      CHECK(std::all_of(t->data(), t->data() + t->size(), [](double x) { return std::isfinite(x); }));
    CHECK(std::all_of(g.bias.begin(), g.bias.end(), [](double x) { return std::isfinite(x); }));
    check_all_gradients(p, bias, options);
  };
  check_policy(alibi<double, true>{4});  // diagonal path
  check_policy(make_fire());              // per-cell path

  // Every row blind: everything exactly zero.
  problem p;
  const gradients g = backward(p, alibi<double, true>{4}, attention_options<double>{.mask = masking::causal, .k_start = 100});
  for (const tensor<double>* t : {&g.dq, &g.dk, &g.dv})
    CHECK(std::all_of(t->data(), t->data() + t->size(), [](double x) { return x == 0.0; }));
  CHECK(std::all_of(g.bias.begin(), g.bias.end(), [](double x) { return x == 0.0; }));
}

TEST_CASE("reference backward: FIRE's b2 and unused T5 buckets get zero gradient", "[reference_backward]") {
  problem p;
  const attention_options<double> options{.mask = masking::causal, .q_start = 2};
  // b2 adds the same value to every key of a row: softmax cancels it. Mathematically 0; in
  // floating point the row sum of dS is 0 up to rounding, far below the other entries.
  const fire<double> f = make_fire();
  const gradients fire_grad = backward(p, f, options);
  const double largest = max_abs(fire_grad.bias.data(), index_t(fire_grad.bias.size()));
  REQUIRE(largest > 1e-2);
  for (index_t h = 0; h < f.num_heads(); ++h)
    CHECK(std::abs(fire_grad.bias[std::size_t(f.b2_index() + h)]) <= 1e-13 * largest);  // seen: 2e-15

  // Causal 32/128 buckets: the distances seen, 0..6, are buckets 0..6; no cell touches the others.
  t5<double> bias{4, masking::causal, 32, 128};
  bias.reset_parameters(5, 4.0);
  const gradients t5_grad = backward(p, bias, options);
  for (index_t bucket = 0; bucket < 32; ++bucket)
    for (index_t h = 0; h < 4; ++h) {
      INFO("bucket " << bucket << ", head " << h);
      const double g = t5_grad.bias[std::size_t(bucket * 4 + h)];
      if (bucket >= 7) CHECK(g == 0.0);
      if (bucket >= 1 && bucket < 7) CHECK(g != 0.0);  // bucket 0 is the diagonal only
    }
}

TEST_CASE("reference backward: dq, dk, dv are overwritten, bias_grad accumulates", "[reference_backward]") {
  problem p;
  const attention_options<double> options{.mask = masking::causal, .q_start = 2};
  const kerple_log<double> bias{4, 3};
  const gradients fresh = backward(p, bias, options);
  const gradients reused = backward(p, bias, options, std::numeric_limits<double>::quiet_NaN(), 0.25);
  for (auto [a, b] : {std::pair{&fresh.dq, &reused.dq}, {&fresh.dk, &reused.dk}, {&fresh.dv, &reused.dv}})
    CHECK(std::equal(a->data(), a->data() + a->size(), b->data()));  // NaN garbage gone, values identical
  for (std::size_t n = 0; n < fresh.bias.size(); ++n) CHECK(reused.bias[n] - 0.25 == Approx(fresh.bias[n]).margin(1e-15));

  // Two layers sharing one table: two backward calls into the same buffer sum.
  const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  gradients twice = backward(p, bias, options);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(),
                               std::span<const double>(forward.lse), bias, options, twice.dq.view(), twice.dk.view(),
                               twice.dv.view(), std::span<double>(twice.bias));
  for (std::size_t n = 0; n < fresh.bias.size(); ++n) CHECK(twice.bias[n] == Approx(2 * fresh.bias[n]).margin(1e-15));
  CHECK(std::equal(fresh.dk.data(), fresh.dk.data() + fresh.dk.size(), twice.dk.data()));

  // No bias gradient wanted: an empty span leaves the policy alone, dq/dk/dv unchanged.
  gradients none = backward(p, bias, options);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(),
                               std::span<const double>(forward.lse), bias, options, none.dq.view(), none.dk.view(),
                               none.dv.view());
  CHECK(std::equal(fresh.dq.data(), fresh.dq.data() + fresh.dq.size(), none.dq.data()));
}

TEST_CASE("reference backward: GQA dk, dv sum the group's query heads", "[reference_backward]") {
  // With Hk = Hq (each k/v head repeated), the gradient of a repeated head is that query head's
  // share; the grouped dk / dv must equal the sum of the shares of its group.
  problem grouped;
  shape full_shape = grouped.s;
  full_shape.hk = grouped.s.hq;
  problem full(full_shape);
  full.q = grouped.q;
  full.weights = grouped.weights;
  const index_t group = grouped.s.hq / grouped.s.hk;
  for (index_t b = 0; b < grouped.s.batch; ++b)
    for (index_t c = 0; c < grouped.s.lk; ++c)
      for (index_t h = 0; h < full_shape.hk; ++h) {
        for (index_t d = 0; d < grouped.s.dim; ++d) full.k(b, c, h, d) = grouped.k(b, c, h / group, d);
        for (index_t d = 0; d < grouped.s.dim_v; ++d) full.v(b, c, h, d) = grouped.v(b, c, h / group, d);
      }
  const attention_options<double> options{.mask = masking::causal, .q_start = 4, .k_start = 1};
  const gradients g = backward(grouped, alibi<double, true>{4}, options), r = backward(full, alibi<double, true>{4}, options);
  CHECK(std::equal(g.dq.data(), g.dq.data() + g.dq.size(), r.dq.data()));
  for (std::size_t n = 0; n < g.bias.size(); ++n) CHECK(g.bias[n] == Approx(r.bias[n]).margin(1e-15));
  for (index_t b = 0; b < grouped.s.batch; ++b)
    for (index_t c = 0; c < grouped.s.lk; ++c)
      for (index_t hk = 0; hk < grouped.s.hk; ++hk) {
        for (index_t d = 0; d < grouped.s.dim; ++d)
          CHECK(g.dk(b, c, hk, d) == Approx(r.dk(b, c, 2 * hk, d) + r.dk(b, c, 2 * hk + 1, d)).margin(1e-15));
        for (index_t d = 0; d < grouped.s.dim_v; ++d)
          CHECK(g.dv(b, c, hk, d) == Approx(r.dv(b, c, 2 * hk, d) + r.dv(b, c, 2 * hk + 1, d)).margin(1e-15));
      }
}

namespace {

double max_difference(tensor_view<const double> a, const tensor<double>& b) {
  double worst = 0;
  for (index_t n = 0; n < a.batch; ++n)
    for (index_t s = 0; s < a.seq; ++s)
      for (index_t h = 0; h < a.heads; ++h)
        for (index_t d = 0; d < a.dim; ++d) worst = std::max(worst, std::abs(a.row(n, s, h)[d] - b(n, s, h, d)));
  return worst;
}

}  // namespace

TEST_CASE("reference backward: bshd and bhsd layouts give the same gradients", "[reference_backward]") {
  problem p;
  const shape& s = p.s;
  const attention_options<double> options{.mask = masking::bidirectional, .q_start = 3};
  const kerple_power<double> bias{4, 3};
  const gradients expected = backward(p, bias, options);

  const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  const auto q = to_bhsd(p.q), k = to_bhsd(p.k), v = to_bhsd(p.v), o = to_bhsd(forward.out), d_out = to_bhsd(p.weights);
  std::vector<double> dq(q.size()), dk(k.size()), dv(v.size()), bias_grad(expected.bias.size());
  const auto dq_view = bhsd(dq.data(), s.batch, s.hq, s.lq, s.dim), dk_view = bhsd(dk.data(), s.batch, s.hk, s.lk, s.dim),
             dv_view = bhsd(dv.data(), s.batch, s.hk, s.lk, s.dim_v);
  reference_attention_backward(bhsd(q.data(), s.batch, s.hq, s.lq, s.dim), bhsd(k.data(), s.batch, s.hk, s.lk, s.dim),
                               bhsd(v.data(), s.batch, s.hk, s.lk, s.dim_v), bhsd(o.data(), s.batch, s.hq, s.lq, s.dim_v),
                               bhsd(d_out.data(), s.batch, s.hq, s.lq, s.dim_v), std::span<const double>(forward.lse), bias,
                               options, dq_view, dk_view, dv_view, std::span<double>(bias_grad));
  CHECK(max_difference(dq_view, expected.dq) <= 1e-15);
  CHECK(max_difference(dk_view, expected.dk) <= 1e-15);
  CHECK(max_difference(dv_view, expected.dv) <= 1e-15);
  for (std::size_t n = 0; n < bias_grad.size(); ++n) CHECK(bias_grad[n] == Approx(expected.bias[n]).margin(1e-15));
}

TEST_CASE("reference backward: invalid arguments name the argument and the values", "[reference_backward]") {
  // q [1, 2, 2, 3], k [1, 4, 1, 3], v [1, 4, 1, 2]; o, d_out [1, 2, 2, 2]; lse 4 values.
  std::vector<double> q(12, 0.1), k(12, 0.2), v(8, 0.3), o(8, 0.0), d_out(8, 1.0), lse(4, 0.0), dq(64), dk(64), dv(64),
      grad(8);
  const auto Q = bshd<const double>(q.data(), 1, 2, 2, 3), K = bshd<const double>(k.data(), 1, 4, 1, 3),
             V = bshd<const double>(v.data(), 1, 4, 1, 2), O = bshd<const double>(o.data(), 1, 2, 2, 2),
             dO = bshd<const double>(d_out.data(), 1, 2, 2, 2);
  const auto dQ = bshd(dq.data(), 1, 2, 2, 3), dK = bshd(dk.data(), 1, 4, 1, 3), dV = bshd(dv.data(), 1, 4, 1, 2);
  const std::span<const double> LSE(lse);
  const alibi<double, true> learned{2};  // 2 parameters
  const alibi<double> fixed{2};
  const attention_options<double> options{};
  REQUIRE_NOTHROW(reference_attention_backward(Q, K, V, O, dO, LSE, learned, options, dQ, dK, dV, std::span(grad.data(), 2)));
  REQUIRE_NOTHROW(reference_attention_backward(Q, K, V, O, dO, LSE, learned, options, dQ, dK, dV));
  REQUIRE_NOTHROW(reference_attention_backward(Q, K, V, O, dO, LSE, fixed, options, dQ, dK, dV));

  using Catch::Contains;
  const auto where = Contains("relbias::reference_attention_backward");
  auto with = [&](auto o_, auto d_out_, auto dq_, auto dk_, auto dv_, std::span<const double> lse_, std::size_t grad_size) {
    reference_attention_backward(Q, K, V, o_, d_out_, lse_, learned, options, dq_, dk_, dv_, std::span(grad.data(), grad_size));
  };
  CHECK_THROWS_WITH(with(bshd<const double>(o.data(), 1, 2, 2, 3), dO, dQ, dK, dV, LSE, 2),
                    where && Contains("o must have shape") && Contains("[1, 2, 2, 2]") && Contains("got [1, 2, 2, 3]"));
  CHECK_THROWS_WITH(with(O, bshd<const double>(d_out.data(), 1, 1, 2, 2), dQ, dK, dV, LSE, 2),
                    Contains("d_out must have shape") && Contains("[1, 2, 2, 2]") && Contains("got [1, 1, 2, 2]"));
  CHECK_THROWS_WITH(with(O, bshd<const double>(nullptr, 1, 2, 2, 2), dQ, dK, dV, LSE, 2), Contains("d_out has no data"));
  CHECK_THROWS_WITH(with(O, dO, bshd(dq.data(), 1, 2, 1, 3), dK, dV, LSE, 2),
                    Contains("dq must have shape") && Contains("[1, 2, 2, 3]") && Contains("got [1, 2, 1, 3]"));
  CHECK_THROWS_WITH(with(O, dO, dQ, bshd(dk.data(), 1, 4, 2, 3), dV, LSE, 2),
                    Contains("dk must have shape") && Contains("[1, 4, 1, 3]") && Contains("got [1, 4, 2, 3]"));
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, bshd(dv.data(), 1, 4, 1, 3), LSE, 2),
                    Contains("dv must have shape") && Contains("[1, 4, 1, 2]") && Contains("got [1, 4, 1, 3]"));
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, bshd<double>(nullptr, 1, 4, 1, 2), LSE, 2), Contains("dv has no data"));
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, dV, LSE.first(3), 2), where && Contains("lse must hold batch * heads * Lq = 4 values, got 3"));
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, dV, {}, 2), Contains("lse must hold") && Contains("got 0"));  // required here
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, dV, LSE, 3), where && Contains("bias_grad") && Contains("2 parameters") && Contains("got 3"));
  CHECK_THROWS_WITH(with(O, dO, dQ, dK, dV, LSE, 1), Contains("bias_grad") && Contains("got 1"));
  CHECK_THROWS_WITH(reference_attention_backward(Q, K, V, O, dO, LSE, fixed, options, dQ, dK, dV, std::span(grad.data(), 2)),
                    where && Contains("bias_grad must be empty: the policy has no learned parameters, got 2 values"));
  // q, k, v and options go through the forward's checks
  CHECK_THROWS_WITH(reference_attention_backward(Q, K, V, O, dO, LSE, alibi<double>{3}, options, dQ, dK, dV),
                    where && Contains("bias.num_heads() (3) must equal q.heads (2)"));
  CHECK_THROWS_WITH(reference_attention_backward(Q, bshd<const double>(k.data(), 1, 4, 1, 2), V, O, dO, LSE, fixed, options, dQ,
                                                 bshd(dk.data(), 1, 4, 1, 2), dV),
                    Contains("k must have shape") && Contains("got [1, 4, 1, 2]"));
  CHECK_THROWS_WITH(reference_attention_backward(Q, K, V, O, dO, LSE, fixed, attention_options<double>{.scale = -std::numeric_limits<double>::infinity()},
                                                 dQ, dK, dV),
                    Contains("options.scale must be finite, got -inf"));
}
