// The reference forward: against hand-computed softmax values, against a naive per-element
// loop, and its invariances (GQA = repeated heads, layouts, default scale); every error.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_reference.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/none.hpp>

#include <cmath>
#include <limits>
#include <vector>

using namespace relbias;
using relbias_test::random_tensor;
using relbias_test::to_bhsd;

namespace {

/// +1 on the cells with i == j: puts the bias where the absolute positions say, so a wrong
/// q_start / k_start moves it to another column of the hand computation.
struct diagonal_bonus {
  using scalar_type = double;
  index_t heads = 1;
  index_t num_heads() const { return heads; }
  double operator()(index_t, index_t i, index_t j) const { return i == j ? 1.0 : 0.0; }
};

/// Not shift-invariant and different per head: catches a bias read at the wrong (h, i, j).
struct position_product_bias {
  using scalar_type = double;
  index_t heads = 1;
  index_t num_heads() const { return heads; }
  double operator()(index_t h, index_t i, index_t j) const { return 0.01 * double(h + 1) * double(i) - 0.03 * double(j) + 0.002 * double(i * j); }
};

static_assert(bias_policy<diagonal_bonus> && bias_policy<position_product_bias>);

/// The hand-computed problem: B = 1, H = 1, Lq = 2, Lk = 3, D = 4 (default scale 1/sqrt(4) = 0.5,
/// exact), Dv = 2.
///   q0 = [ 2, 0, 0, 0]      k0 = [0, 0, 2, 0]   v0 = [1, 0]
///   q1 = [-2, 0, 2, 0]      k1 = [1, 0, 0, 0]   v1 = [0, 1]
///                           k2 = [2, 0, 2, 0]   v2 = [1, 1]
///   Q K^T = [[0, 2, 4], [4, -2, 0]];  times 0.5: [[0, 1, 2], [2, -1, 0]]
struct hand_problem {
  std::vector<double> q{2, 0, 0, 0, -2, 0, 2, 0};
  std::vector<double> k{0, 0, 2, 0, 1, 0, 0, 0, 2, 0, 2, 0};
  std::vector<double> v{1, 0, 0, 1, 1, 1};
  std::vector<double> o = std::vector<double>(4, -7.0);  // garbage: the kernel must overwrite it
  std::vector<double> lse = std::vector<double>(2, -7.0);

  attention_result<double> run(const attention_options<double>& options) {
    reference_attention(bshd<const double>(q.data(), 1, 2, 1, 4), bshd<const double>(k.data(), 1, 3, 1, 4),
                        bshd<const double>(v.data(), 1, 3, 1, 2), diagonal_bonus{}, options,
                        bshd(o.data(), 1, 2, 1, 2), std::span<double>(lse));
    attention_result<double> r{tensor<double>(1, 2, 1, 2), lse};
    std::copy(o.begin(), o.end(), r.out.data());
    return r;
  }
};

void check_row(const attention_result<double>& r, index_t row, double o0, double o1, double lse) {
  INFO("row " << row);
  CHECK(r.out(0, row, 0, 0) == Approx(o0).epsilon(1e-14));
  CHECK(r.out(0, row, 0, 1) == Approx(o1).epsilon(1e-14));
  CHECK(r.lse[std::size_t(row)] == Approx(lse).epsilon(1e-14));
}

/// softmax(scale q.k + bias + mask) v with one std::exp per cell, no Eigen: the definition.
template <class Bias>
attention_result<double> naive_attention(const tensor<double>& q, const tensor<double>& k, const tensor<double>& v,
                                         const Bias& bias, const attention_options<double>& options) {
  const auto qv = q.view(), kv = k.view(), vv = v.view();
  attention_result<double> r{tensor<double>(qv.batch, qv.seq, qv.heads, vv.dim),
                             std::vector<double>(std::size_t(qv.batch * qv.heads * qv.seq))};
  const double scale = options.scale_for(qv.dim);
  for (index_t b = 0; b < qv.batch; ++b)
    for (index_t h = 0; h < qv.heads; ++h)
      for (index_t row = 0; row < qv.seq; ++row) {
        const index_t i = options.q_start + row, hk = h / (qv.heads / kv.heads);
        std::vector<double> s(std::size_t(kv.seq), -std::numeric_limits<double>::infinity());
        double top = -std::numeric_limits<double>::infinity();
        for (index_t c = 0; c < kv.seq; ++c) {
          const index_t j = options.k_start + c;
          if (options.mask == masking::causal && j > i) continue;
          double dot = 0;
          for (index_t d = 0; d < qv.dim; ++d) dot += q(b, row, h, d) * k(b, c, hk, d);
          s[std::size_t(c)] = scale * dot + bias(h, i, j);
          top = std::max(top, s[std::size_t(c)]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::isinf(x) ? 0.0 : std::exp(x - top));
        for (index_t d = 0; d < vv.dim; ++d) {
          double acc = 0;
          for (index_t c = 0; c < kv.seq; ++c) acc += s[std::size_t(c)] * v(b, c, hk, d);
          r.out(b, row, h, d) = sum > 0 ? acc / sum : 0.0;
        }
        r.lse[std::size_t((b * qv.heads + h) * qv.seq + row)] = sum > 0 ? top + std::log(sum) : top;
      }
  return r;
}

/// k or v with each of its heads repeated `times` times (what GQA means).
tensor<double> repeat_heads(const tensor<double>& t, index_t batch, index_t seq, index_t heads, index_t dim, index_t times) {
  tensor<double> out(batch, seq, heads * times, dim);
  for (index_t b = 0; b < batch; ++b)
    for (index_t s = 0; s < seq; ++s)
      for (index_t h = 0; h < heads * times; ++h)
        for (index_t d = 0; d < dim; ++d) out(b, s, h, d) = t(b, s, h / times, d);
  return out;
}

double max_abs_difference(const attention_result<double>& a, const attention_result<double>& b) {
  double worst = 0;
  for (index_t n = 0; n < a.out.size(); ++n) worst = std::max(worst, std::abs(a.out.data()[n] - b.out.data()[n]));
  for (std::size_t n = 0; n < a.lse.size(); ++n)
    worst = std::max(worst, a.lse[n] == b.lse[n] ? 0.0 : std::abs(a.lse[n] - b.lse[n]));  // -inf == -inf
  return worst;
}

}  // namespace

TEST_CASE("reference forward: bidirectional, default scale, by hand", "[reference]") {
  // Scores + bonus at i == j (q_start = k_start = 0: row 0 col 0, row 1 col 1):
  //   row 0: [1, 1, 2] -> P = [e, e, e^2] / (2e + e^2) = [1, 1, e] / (2 + e)
  //          O = [P0 + P2, P1 + P2] = [(1 + e)/(2 + e)] * 2,  lse = log(2e + e^2) = 1 + log(2 + e)
  //   row 1: [2, 0, 0] -> P = [e^2, 1, 1] / (e^2 + 2)
  //          O = [(e^2 + 1)/(e^2 + 2), 2/(e^2 + 2)],  lse = log(e^2 + 2)
  hand_problem p;
  const auto r = p.run({});
  check_row(r, 0, 0.7880584423829146, 0.7880584423829146, 2.5514447139320513);
  check_row(r, 1, 0.8934930210807991, 0.21301395783840146, 2.2395447662218846);
}

TEST_CASE("reference forward: causal with q_start = 1, by hand", "[reference]") {
  // Row 0 is i = 1: sees j = 0, 1; bonus at col 1: [0, 2] -> P = [1, e^2] / (1 + e^2)
  //   O = [1/(1 + e^2), e^2/(1 + e^2)],  lse = log(1 + e^2)
  // Row 1 is i = 2: sees all; bonus at col 2: [2, -1, 1] -> P = [e^2, 1/e, e] / S, S = e^2 + 1/e + e
  //   O = [(e^2 + e)/S, (1/e + e)/S],  lse = log S
  hand_problem p;
  const auto r = p.run({.mask = masking::causal, .q_start = 1});
  check_row(r, 0, 0.11920292202211755, 0.8807970779778823, 2.1269280110429727);
  check_row(r, 1, 0.9648809730406603, 0.29461548730175885, 2.349012216768186);
}

TEST_CASE("reference forward: explicit scale 1 multiplies Q K^T, not the bias", "[reference]") {
  // scale 1: Q K^T = [[0, 2, 4], [4, -2, 0]]; q_start = k_start = 5 keep the bonus on cols 0 and 1:
  //   row 0: [1, 2, 4] -> O = [(e + e^4)/S, (e^2 + e^4)/S], S = e + e^2 + e^4, lse = log S
  //   row 1: [4, -1, 0] -> O = [(e^4 + 1)/S, (1/e + 1)/S], S = e^4 + 1/e + 1, lse = log S
  hand_problem p;
  const auto r = p.run({.q_start = 5, .k_start = 5, .scale = 1.0});
  check_row(r, 0, 0.8858048006154056, 0.9579899338659339, 4.169846019556286);
  check_row(r, 1, 0.993426736814691, 0.024441245055613584, 4.024744890138822);
}

TEST_CASE("reference forward: causal with k_start = 1 (KV-cache style offsets), by hand", "[reference]") {
  // Row 0 (i = 1) sees only j = 1 (col 0): score 0 + bonus 1 -> P = [1, 0, 0], O = v0 = [1, 0], lse = 1
  // Row 1 (i = 2) sees j = 1, 2 (cols 0, 1): [2, -1 + 1] = [2, 0] -> P = [e^2, 1] / (e^2 + 1)
  //   O = [e^2/(e^2 + 1), 1/(e^2 + 1)],  lse = log(e^2 + 1)
  hand_problem p;
  const auto r = p.run({.mask = masking::causal, .q_start = 1, .k_start = 1});
  check_row(r, 0, 1.0, 0.0, 1.0);
  check_row(r, 1, 0.8807970779778823, 0.11920292202211755, 2.1269280110429727);
}

TEST_CASE("reference forward: a row that sees no key gives O = 0 and lse = -inf, no NaN", "[reference]") {
  // Row 0 (i = 0) with keys at j = 1, 2, 3: all in its future. Row 1 (i = 1) sees j = 1 (col 0):
  // score 2 + bonus 1 = 3, O = v0 = [1, 0], lse = 3.
  hand_problem p;
  const auto r = p.run({.mask = masking::causal, .q_start = 0, .k_start = 1});
  CHECK(r.out(0, 0, 0, 0) == 0.0);
  CHECK(r.out(0, 0, 0, 1) == 0.0);
  CHECK(r.lse[0] == -std::numeric_limits<double>::infinity());
  check_row(r, 1, 1.0, 0.0, 3.0);

  // Random data, several masked rows, several heads: still exactly 0 and -inf.
  const auto q = random_tensor<double>(2, 5, 2, 3, 1), k = random_tensor<double>(2, 4, 2, 3, 2),
             v = random_tensor<double>(2, 4, 2, 3, 3);
  const auto out = reference_attention(q.view(), k.view(), v.view(), alibi<double>{2},
                                       attention_options<double>{.mask = masking::causal, .q_start = 0, .k_start = 3});
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 2; ++h)
      for (index_t row = 0; row < 5; ++row) {
        const bool blind = row < 3;  // i = row < 3 = first key position
        CHECK((out.lse[std::size_t((b * 2 + h) * 5 + row)] == -std::numeric_limits<double>::infinity()) == blind);
        for (index_t d = 0; d < 3; ++d) {
          CHECK(std::isfinite(out.out(b, row, h, d)));
          if (blind) CHECK(out.out(b, row, h, d) == 0.0);
        }
      }
}

TEST_CASE("reference forward: agrees with a naive per-element loop", "[reference]") {
  struct config {
    masking mask;
    index_t lq, lk, hq, hk, q_start, k_start;
  };
  for (const config c : {config{masking::bidirectional, 3, 5, 2, 2, 0, 0}, config{masking::causal, 4, 4, 4, 2, 0, 0},
                         config{masking::causal, 3, 7, 4, 1, 4, 0}, config{masking::bidirectional, 6, 2, 3, 3, 10, 3},
                         config{masking::causal, 5, 3, 4, 2, 1, 2}}) {
    INFO("mask " << int(c.mask) << " Lq " << c.lq << " Lk " << c.lk << " Hq " << c.hq << " Hk " << c.hk << " q_start "
                 << c.q_start << " k_start " << c.k_start);
    const auto q = random_tensor<double>(2, c.lq, c.hq, 3, 11), k = random_tensor<double>(2, c.lk, c.hk, 3, 12),
               v = random_tensor<double>(2, c.lk, c.hk, 4, 13);
    const attention_options<double> options{.mask = c.mask, .q_start = c.q_start, .k_start = c.k_start};
    const position_product_bias bias{c.hq};
    const auto got = reference_attention(q.view(), k.view(), v.view(), bias, options);
    const auto expected = naive_attention(q, k, v, bias, options);
    CHECK(max_abs_difference(got, expected) < 1e-13);
  }
}

TEST_CASE("reference forward: the default scale is 1/sqrt(D)", "[reference]") {
  const auto q = random_tensor<double>(1, 4, 2, 5, 21), k = random_tensor<double>(1, 6, 2, 5, 22),
             v = random_tensor<double>(1, 6, 2, 5, 23);
  const alibi<double> bias{2};
  const auto by_default = reference_attention(q.view(), k.view(), v.view(), bias, {});
  const auto explicit_scale =
      reference_attention(q.view(), k.view(), v.view(), bias, attention_options<double>{.scale = 1.0 / std::sqrt(5.0)});
  // Not == 0: Eigen's vectorised row sums start at each allocation's alignment, so the same
  // computation on other heap addresses can differ in the last bit.
  CHECK(max_abs_difference(by_default, explicit_scale) < 1e-15);
  const auto other = reference_attention(q.view(), k.view(), v.view(), bias, attention_options<double>{.scale = 1.0});
  CHECK(max_abs_difference(by_default, other) > 1e-3);  // and the scale does matter
}

TEST_CASE("reference forward: GQA equals repeating the key/value heads", "[reference]") {
  const index_t batch = 2, lq = 5, lk = 6, hq = 4, hk = 2, dim = 3;
  const auto q = random_tensor<double>(batch, lq, hq, dim, 31), k = random_tensor<double>(batch, lk, hk, dim, 32),
             v = random_tensor<double>(batch, lk, hk, dim, 33);
  const auto k_full = repeat_heads(k, batch, lk, hk, dim, hq / hk), v_full = repeat_heads(v, batch, lk, hk, dim, hq / hk);
  for (masking mask : {masking::bidirectional, masking::causal}) {
    const attention_options<double> options{.mask = mask, .q_start = 2, .k_start = 1};
    const position_product_bias bias{hq};
    const auto grouped = reference_attention(q.view(), k.view(), v.view(), bias, options);
    const auto repeated = reference_attention(q.view(), k_full.view(), v_full.view(), bias, options);
    CHECK(max_abs_difference(grouped, repeated) <= 1e-15);
  }
}

TEST_CASE("reference forward: bshd and bhsd layouts give identical results", "[reference]") {
  const index_t batch = 2, lq = 4, lk = 5, hq = 4, hk = 2, dim = 3;
  const auto q = random_tensor<double>(batch, lq, hq, dim, 41), k = random_tensor<double>(batch, lk, hk, dim, 42),
             v = random_tensor<double>(batch, lk, hk, dim, 43);
  const attention_options<double> options{.mask = masking::causal, .q_start = 1};
  const alibi<double> bias{hq};
  const auto expected = reference_attention(q.view(), k.view(), v.view(), bias, options);

  const auto qt = to_bhsd(q), kt = to_bhsd(k), vt = to_bhsd(v);
  std::vector<double> o(std::size_t(batch * hq * lq * dim)), lse(std::size_t(batch * hq * lq));
  reference_attention(bhsd(qt.data(), batch, hq, lq, dim), bhsd(kt.data(), batch, hk, lk, dim), bhsd(vt.data(), batch, hk, lk, dim),
                      bias, options, bhsd(o.data(), batch, hq, lq, dim), std::span<double>(lse));
  const auto ov = bhsd(o.data(), batch, hq, lq, dim);
  double worst = 0;
  for (index_t b = 0; b < batch; ++b)
    for (index_t s = 0; s < lq; ++s)
      for (index_t h = 0; h < hq; ++h)
        for (index_t d = 0; d < dim; ++d) worst = std::max(worst, std::abs(ov.row(b, s, h)[d] - expected.out(b, s, h, d)));
  CHECK(worst <= 1e-15);
  CHECK(lse == expected.lse);  // lse is [b][h][row] whatever the tensors' layout
}

TEST_CASE("reference forward: invalid arguments name the argument and the values", "[reference]") {
  std::vector<double> q(64, 0.1), k(64, 0.2), v(64, 0.3), o(64), lse(8);
  const no_bias<double> one_head{1};
  // Good shapes: q [1, 2, 1, 4], k [1, 3, 1, 4], v [1, 3, 1, 2], o [1, 2, 1, 2], lse 2 values.
  auto run = [&](tensor_view<const double> qv, tensor_view<const double> kv, tensor_view<const double> vv,
                 tensor_view<double> ov, std::size_t lse_size, const attention_options<double>& options = {}) {
    reference_attention(qv, kv, vv, one_head, options, ov, std::span<double>(lse.data(), lse_size));
  };
  const auto Q = bshd<const double>(q.data(), 1, 2, 1, 4), K = bshd<const double>(k.data(), 1, 3, 1, 4),
             V = bshd<const double>(v.data(), 1, 3, 1, 2);
  const auto O = bshd(o.data(), 1, 2, 1, 2);
  REQUIRE_NOTHROW(run(Q, K, V, O, 2));
  REQUIRE_NOTHROW(run(Q, K, V, O, 0));  // lse is optional in the forward

  using Catch::Contains;
  const auto where = Contains("relbias::reference_attention");
  // mismatched shapes
  CHECK_THROWS_WITH(run(Q, bshd<const double>(k.data(), 1, 3, 1, 3), V, O, 2),
                    where && Contains("k must have shape") && Contains("[1, 3, 1, 4]") && Contains("got [1, 3, 1, 3]"));
  CHECK_THROWS_WITH(run(Q, bshd<const double>(k.data(), 2, 3, 1, 4), V, O, 2),
                    Contains("k must have shape") && Contains("got [2, 3, 1, 4]"));
  CHECK_THROWS_WITH(run(Q, K, bshd<const double>(v.data(), 1, 4, 1, 2), O, 2),
                    Contains("v must have shape") && Contains("[1, 3, 1, 2]") && Contains("got [1, 4, 1, 2]"));
  CHECK_THROWS_WITH(run(Q, K, bshd<const double>(v.data(), 1, 3, 2, 2), O, 2),
                    Contains("v must have shape") && Contains("got [1, 3, 2, 2]"));
  CHECK_THROWS_WITH(run(Q, K, V, bshd(o.data(), 1, 2, 1, 4), 2),
                    Contains("o must have shape") && Contains("[1, 2, 1, 2]") && Contains("got [1, 2, 1, 4]"));
  CHECK_THROWS_WITH(run(Q, K, V, bshd(o.data(), 1, 3, 1, 2), 2), Contains("o must have shape") && Contains("got [1, 3, 1, 2]"));
  // zero sizes
  CHECK_THROWS_WITH(run(bshd<const double>(q.data(), 1, 0, 1, 4), K, V, O, 2),
                    Contains("q [batch, seq, heads, dim] must all be >= 1") && Contains("got [1, 0, 1, 4]"));
  CHECK_THROWS_WITH(run(Q, bshd<const double>(k.data(), 1, 0, 1, 4), V, O, 2),
                    Contains("k [batch, seq, heads, dim] must all be >= 1") && Contains("got [1, 0, 1, 4]"));
  CHECK_THROWS_WITH(run(Q, K, bshd<const double>(v.data(), 1, 3, 1, 0), O, 2),
                    Contains("v [batch, seq, heads, dim] must all be >= 1") && Contains("got [1, 3, 1, 0]"));
  // null data
  CHECK_THROWS_WITH(run(bshd<const double>(nullptr, 1, 2, 1, 4), K, V, O, 2), Contains("q has no data"));
  CHECK_THROWS_WITH(run(Q, bshd<const double>(nullptr, 1, 3, 1, 4), V, O, 2), Contains("k has no data"));
  CHECK_THROWS_WITH(run(Q, K, bshd<const double>(nullptr, 1, 3, 1, 2), O, 2), Contains("v has no data"));
  CHECK_THROWS_WITH(run(Q, K, V, bshd<double>(nullptr, 1, 2, 1, 2), 2), Contains("o has no data"));
  // heads: q.heads a multiple of k.heads, bias heads == q.heads
  CHECK_THROWS_WITH(reference_attention(bshd<const double>(q.data(), 1, 2, 3, 4), bshd<const double>(k.data(), 1, 3, 2, 4),
                                        bshd<const double>(v.data(), 1, 3, 2, 2), no_bias<double>{3}, {},
                                        bshd(o.data(), 1, 2, 3, 2)),
                    Contains("q.heads (3) must be a multiple of k.heads (2)"));
  CHECK_THROWS_WITH(reference_attention(Q, K, V, no_bias<double>{2}, {}, O),
                    Contains("bias.num_heads() (2) must equal q.heads (1)"));
  CHECK_THROWS_WITH(reference_attention(Q, K, V, no_bias<double>{2}), Contains("bias.num_heads() (2)"));  // owning overload
  // lse
  CHECK_THROWS_WITH(run(Q, K, V, O, 3), Contains("lse must hold batch * heads * Lq = 2 values, got 3"));
  CHECK_THROWS_WITH(run(Q, K, V, O, 1), Contains("lse must hold") && Contains("got 1"));
  // options
  CHECK_THROWS_WITH(run(Q, K, V, O, 2, {.scale = std::numeric_limits<double>::infinity()}),
                    Contains("options.scale must be finite, got inf"));
  CHECK_THROWS_WITH(run(Q, K, V, O, 2, {.scale = std::nan("")}), Contains("options.scale must be finite") && Contains("nan"));
  CHECK_THROWS_WITH(run(Q, K, V, O, 2, {.num_threads = -1}), Contains("options.num_threads must be >= 0, got -1"));
}
