// Real batches: padded, packed and batched-decoding layouts and sliding windows. One call over a
// batch must equal running each sequence alone (bit for bit where the arithmetic is the same),
// the fused kernels must match the reference, padding is never read, and bad arguments throw.
#include "catch.hpp"
#include "gradient_check.hpp"
#include "random_tensors.hpp"
#include "user_policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/attention_reference_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/t5.hpp>
#include <relbias/sequences.hpp>

#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <typeinfo>
#include <vector>

using namespace relbias;
using relbias_test::random_tensor;
using relbias_test::learned_wave;
using relbias_test::wave_bias;

namespace {

constexpr index_t heads = 4, kv_heads = 2, dim = 8, dim_v = 6;
constexpr detail::tile_shape small_tiles{.rows = 4, .cols = 8};

template <class S>
constexpr double tolerance() { return std::is_same_v<S, float> ? 5e-5 : 1e-11; }

/// A batch: tensor sizes, its sequences, its mask.
struct batch_case {
  std::string name;
  index_t batch, lq, lk;
  std::vector<sequence> sequences;
};

std::vector<batch_case> batch_cases() {
  const std::vector<index_t> lengths{5, 17, 0, 12};
  const std::vector<index_t> cu{0, 5, 22, 23, 35};
  const std::vector<index_t> cu_q{0, 3, 3, 10}, cu_k{0, 9, 14, 30};
  const std::vector<index_t> cache{7, 33, 0, 20};
  std::vector<batch_case> cases{
      {"padded right", 4, 17, 17, padded_sequences(lengths, 17)},
      {"padded left", 4, 17, 17, padded_sequences(lengths, 17, padding::left)},
      {"packed", 1, 35, 35, packed_sequences(cu)},
      {"packed, positions given", 1, 35, 35, packed_sequences(cu)},
      {"packed cross-attention", 1, 10, 30, packed_sequences(cu_q, cu_k)},
      {"decoding, one token", 4, 1, 40, decoding_sequences(cache, 1, 40)},
      {"decoding, three tokens", 4, 3, 40, decoding_sequences(cache, 3, 40)},
  };
  const index_t given[] = {3, 100, 0, 7};
  for (std::size_t s = 0; s < cases[3].sequences.size(); ++s) {
    cases[3].sequences[s].q_start = given[s] + 2;
    cases[3].sequences[s].k_start = given[s];
  }
  return cases;
}

/// Rows of [batch, rows] that no sequence holds.
std::vector<char> held_rows(const batch_case& c, index_t rows, bool query_rows) {
  std::vector<char> held(std::size_t(c.batch * rows), 0);
  for (const sequence& s : c.sequences) {
    const index_t begin = query_rows ? s.q_begin : s.k_begin, length = query_rows ? s.q_length : s.k_length;
    for (index_t r = begin; r < begin + length; ++r) held[std::size_t(s.batch * rows + r)] = 1;
  }
  return held;
}

/// Random values in the rows of sequences and NaN in every other row: a kernel that reads
/// padding (or another sequence's rows, which are NaN-free but then differ) fails the tests.
template <class S>
tensor<S> input(const batch_case& c, index_t rows, index_t h, index_t d, bool query_rows, std::uint64_t seed) {
  tensor<S> t = random_tensor<S>(c.batch, rows, h, d, seed);
  const std::vector<char> held = held_rows(c, rows, query_rows);
  for (index_t b = 0; b < c.batch; ++b)
    for (index_t r = 0; r < rows; ++r)
      if (!held[std::size_t(b * rows + r)])
        for (index_t n = 0; n < h; ++n) t.view().rows(b, n, r, 1).setConstant(std::numeric_limits<S>::quiet_NaN());
  return t;
}

template <class S>
struct problem {
  tensor<S> q, k, v, d_out;
};

template <class S>
problem<S> make_problem(const batch_case& c) {
  return {input<S>(c, c.lq, heads, dim, true, 21), input<S>(c, c.lk, kv_heads, dim, false, 22),
          input<S>(c, c.lk, kv_heads, dim_v, false, 23), input<S>(c, c.lq, heads, dim_v, true, 24)};
}

template <class S>
struct result {
  tensor<S> o;
  std::vector<S> lse;
  tensor<S> dq, dk, dv;
  std::vector<S> bias_grad;
};

/// Outputs and gradients shaped for p, the bias gradient zeroed (empty without parameters).
template <class Bias, class S = typename Bias::scalar_type>
result<S> empty_result(const Bias& bias, const problem<S>& p) {
  const auto q = p.q.view(), k = p.k.view();
  result<S> r{tensor<S>(q.batch, q.seq, heads, dim_v), std::vector<S>(std::size_t(q.batch * heads * q.seq)),
              tensor<S>(q.batch, q.seq, heads, dim), tensor<S>(k.batch, k.seq, kv_heads, dim),
              tensor<S>(k.batch, k.seq, kv_heads, dim_v), {}};
  if constexpr (learned_bias<Bias>) r.bias_grad.assign(std::size_t(bias.parameters().size()), S(0));
  return r;
}

/// Fused forward and backward with the given tiles through the kernels' own entry (the public
/// functions choose their own tiles: forward_tiles, backward_problem; these test many tiles on small inputs).
template <class Bias, class S = typename Bias::scalar_type>
result<S> run_fused(const Bias& bias, const problem<S>& p, const attention_options<S>& options) {
  const auto q = p.q.view(), k = p.k.view(), v = p.v.view();
  result<S> r = empty_result(bias, p);
  const detail::forward_problem<S> fp{q, k, v, r.o.view(), std::span<S>(r.lse), options, options.scale_for(dim), heads / kv_heads,
                                      small_tiles};
  const detail::batch_layout layout = detail::make_layout(options, q.batch, q.seq, k.seq);
  detail::fused_forward(fp, layout, detail::make_bias_plan(bias, detail::visited_window(layout), 1));
  detail::backward_problem<S> bp{q, k, v, r.o.view(), p.d_out.view(), r.lse, r.dq.view(), r.dk.view(), r.dv.view(),
                                 options, options.scale_for(dim), heads / kv_heads, small_tiles};
  detail::run_backward(bp, bias, std::span<S>(r.bias_grad));
  return r;
}

template <class Bias, class S = typename Bias::scalar_type>
result<S> run_reference(const Bias& bias, const problem<S>& p, const attention_options<S>& options) {
  const auto q = p.q.view(), k = p.k.view(), v = p.v.view();
  result<S> r = empty_result(bias, p);
  reference_attention(q, k, v, bias, options, r.o.view(), std::span<S>(r.lse));
  reference_attention_backward(q, k, v, r.o.view(), p.d_out.view(), std::span<const S>(r.lse), bias, options, r.dq.view(),
                               r.dk.view(), r.dv.view(), std::span<S>(r.bias_grad));
  return r;
}

/// Rows [first, first + count) of t's batch element b as a [1, count, heads, dim] copy.
template <class S>
tensor<S> copy_rows(const tensor<S>& t, index_t b, index_t first, index_t count) {
  const auto v = t.view();
  tensor<S> out(1, count, v.heads, v.dim);
  for (index_t h = 0; h < v.heads; ++h) out.view().rows(0, h, 0, count) = v.rows(b, h, first, count);
  return out;
}

/// max |a - b| / max(|b|, 1) over `count` rows of every head (a's from a_first in batch a_b,
/// b's from b_first in batch b_b); infinity if either holds a NaN.
template <class S>
double rows_error(const tensor<S>& a, index_t a_b, index_t a_first, const tensor<S>& b, index_t b_b, index_t b_first,
                  index_t count) {
  double worst = 0;
  const auto x = a.view(), y = b.view();
  for (index_t h = 0; h < x.heads; ++h)
    for (index_t r = 0; r < count; ++r)
      for (index_t d = 0; d < x.dim; ++d) {
        const double u = x.row(a_b, a_first + r, h)[d], w = y.row(b_b, b_first + r, h)[d];
        if (std::isnan(u) || std::isnan(w)) return std::numeric_limits<double>::infinity();
        worst = std::max(worst, std::abs(u - w) / std::max(std::abs(w), 1.0));
      }
  return worst;
}

template <class S>
double values_error(std::span<const S> a, std::span<const S> b) {
  double worst = 0;
  for (std::size_t n = 0; n < a.size(); ++n) {
    if (a[n] == b[n]) continue;  // also -inf == -inf
    if (std::isnan(a[n]) || std::isnan(b[n]) || std::isinf(a[n]) || std::isinf(b[n])) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, std::abs(double(a[n]) - double(b[n])) / std::max(std::abs(double(b[n])), 1.0));
  }
  return worst;
}

/// Whether every row outside the sequences has O = 0, lse = -inf, dQ = 0, dK = dV = 0.
template <class S>
bool padding_is_inert(const batch_case& c, const result<S>& r) {
  const std::vector<char> q_held = held_rows(c, c.lq, true), k_held = held_rows(c, c.lk, false);
  auto zero = [](const tensor<S>& t, index_t b, index_t row) {
    for (index_t h = 0; h < t.view().heads; ++h)
      if (!t.view().rows(b, h, row, 1).isZero(0)) return false;
    return true;
  };
  for (index_t b = 0; b < c.batch; ++b) {
    for (index_t row = 0; row < c.lq; ++row)
      if (!q_held[std::size_t(b * c.lq + row)]) {
        if (!zero(r.o, b, row) || !zero(r.dq, b, row)) return false;
        for (index_t h = 0; h < heads; ++h)
          if (r.lse[std::size_t((b * heads + h) * c.lq + row)] != -std::numeric_limits<S>::infinity()) return false;
      }
    for (index_t row = 0; row < c.lk; ++row)
      if (!k_held[std::size_t(b * c.lk + row)] && (!zero(r.dk, b, row) || !zero(r.dv, b, row))) return false;
  }
  return true;
}

/// Errors of the batch call against each sequence run alone (same tiles, same positions):
/// O, lse, dQ, dK, dV, and the bias gradient against the sum of the sequences' gradients.
struct alone_errors {
  double values = 0, bias_grad = 0;
};

template <class Bias, class S = typename Bias::scalar_type>
alone_errors batch_vs_alone(const Bias& bias, const batch_case& c, const problem<S>& p, const result<S>& batch,
                            const attention_options<S>& options) {
  alone_errors e;
  std::vector<S> summed(batch.bias_grad.size(), S(0));
  for (const sequence& s : c.sequences) {
    if (s.q_length == 0) continue;  // nothing to compare; padding_is_inert covers its rows
    if (s.k_length == 0) {          // no key: O = 0, lse = -inf, no gradient
      e.values = std::max(e.values, rows_error(batch.o, s.batch, s.q_begin, tensor<S>(1, s.q_length, heads, dim_v), 0, 0, s.q_length));
      continue;
    }
    const problem<S> alone{copy_rows(p.q, s.batch, s.q_begin, s.q_length), copy_rows(p.k, s.batch, s.k_begin, s.k_length),
                           copy_rows(p.v, s.batch, s.k_begin, s.k_length), copy_rows(p.d_out, s.batch, s.q_begin, s.q_length)};
    attention_options<S> own = options;
    own.sequences = {};
    own.q_start = s.q_start;
    own.k_start = s.k_start;
    const result<S> r = run_fused(bias, alone, own);
    e.values = std::max({e.values, rows_error(batch.o, s.batch, s.q_begin, r.o, 0, 0, s.q_length),
                         rows_error(batch.dq, s.batch, s.q_begin, r.dq, 0, 0, s.q_length),
                         rows_error(batch.dk, s.batch, s.k_begin, r.dk, 0, 0, s.k_length),
                         rows_error(batch.dv, s.batch, s.k_begin, r.dv, 0, 0, s.k_length)});
    for (index_t h = 0; h < heads; ++h) {
      const auto first = std::size_t((s.batch * heads + h) * c.lq + s.q_begin);
      e.values = std::max(e.values, values_error<S>(std::span(batch.lse).subspan(first, std::size_t(s.q_length)),
                                                    std::span(r.lse).subspan(std::size_t(h * s.q_length), std::size_t(s.q_length))));
    }
    for (std::size_t n = 0; n < summed.size(); ++n) summed[n] += r.bias_grad[n];
  }
  e.bias_grad = values_error<S>(batch.bias_grad, summed);
  return e;
}

/// Every policy, built for the mask: visit(bias, bit_exact), bit_exact for all of them (KERPLE's
/// table takes the packet log1p for every offset, wherever the call's table starts).
template <class S, class Visit>
void for_each_policy(masking mask, Visit visit) {
  visit(no_bias<S>{heads}, true);
  visit(alibi<S>{heads}, true);
  visit(alibi<S, true>{heads}, true);
  t5<S> t5_bias{heads, mask, 8, 16};
  t5_bias.reset_parameters(1, 2.0);
  visit(t5_bias, true);
  per_offset<S> offsets{heads, mask, 5};
  offsets.reset_parameters(2, 0.5);
  visit(offsets, true);
  visit(kerple_power<S>{heads, 3}, true);
  visit(kerple_log<S>{heads, 3}, true);
  visit(fire<S>{heads, 5, fire_config{.width = 12, .init_L = 8}}, true);  // rows below, at and past L
  visit(wave_bias<S>{heads}, true);
  visit(learned_wave<S>{heads}, true);
}

std::string window_text(std::optional<index_t> window) { return window ? std::to_string(*window) : "none"; }

}  // namespace

TEMPLATE_TEST_CASE("sequences: one call over a batch equals each sequence alone, forward and backward, every policy",
                   "[sequences]", float, double) {
  using S = TestType;
  for (const batch_case& c : batch_cases())
    for (masking mask : {masking::bidirectional, masking::causal})
      for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{3}, std::optional<index_t>{9}}) {
        const problem<S> p = make_problem<S>(c);
        const attention_options<S> options{.mask = mask, .sliding_window = window, .sequences = c.sequences, .num_threads = 1};
        for_each_policy<S>(mask, [&](const auto& bias, bool bit_exact) {
          INFO(c.name << ", mask " << int(mask) << ", window " << window_text(window) << ", policy " << typeid(bias).name());
          const result<S> batch = run_fused(bias, p, options);
          CHECK(padding_is_inert(c, batch));
          const alone_errors e = batch_vs_alone(bias, c, p, batch, options);
          if (bit_exact) CHECK(e.values == 0);
          else CHECK(e.values < tolerance<S>());
          CHECK(e.bias_grad < tolerance<S>());

          const result<S> expected = run_reference(bias, p, options);
          CHECK(padding_is_inert(c, expected));
          double worst = values_error<S>(batch.lse, expected.lse);
          for (index_t b = 0; b < c.batch; ++b)
            worst = std::max({worst, rows_error(batch.o, b, 0, expected.o, b, 0, c.lq), rows_error(batch.dq, b, 0, expected.dq, b, 0, c.lq),
                              rows_error(batch.dk, b, 0, expected.dk, b, 0, c.lk), rows_error(batch.dv, b, 0, expected.dv, b, 0, c.lk)});
          CHECK(worst < tolerance<S>());
          CHECK(values_error<S>(batch.bias_grad, expected.bias_grad) < tolerance<S>());
        });
      }
}

TEMPLATE_TEST_CASE("sequences: sliding windows through the public entry points, default tiles, two threads", "[sequences]",
                   float, double) {
  using S = TestType;
  // 700 queries against 900 keys: several default tiles, most of them outside a window of 100.
  const index_t lq = 700, lk = 900;
  const auto q = random_tensor<S>(2, lq, heads, dim, 31), k = random_tensor<S>(2, lk, kv_heads, dim, 32),
             v = random_tensor<S>(2, lk, kv_heads, dim_v, 33), d_out = random_tensor<S>(2, lq, heads, dim_v, 34);
  for (masking mask : {masking::bidirectional, masking::causal})
    for (index_t window : {1, 100, 2000}) {
      t5<S> t5_bias{heads, mask, 32, 128};  // the policy's mode must match options.mask
      t5_bias.reset_parameters(3, 1.0);
      INFO("mask " << int(mask) << ", window " << window);
      const attention_options<S> options{.mask = mask, .sliding_window = window, .q_start = lk - lq, .num_threads = 2};
      auto check = [&](const auto& bias) {
        const auto got = attention(q.view(), k.view(), v.view(), bias, options);
        const auto expected = reference_attention(q.view(), k.view(), v.view(), bias, options);
        CHECK(relbias_test::max_relative_error<S>(got.out.view(), expected.out.view()) < tolerance<S>());
        CHECK(values_error<S>(got.lse, expected.lse) < tolerance<S>());
        tensor<S> dq(2, lq, heads, dim), dk(2, lk, kv_heads, dim), dv(2, lk, kv_heads, dim_v), rq = dq, rk = dk, rv = dv;
        std::vector<S> grad, expected_grad;
        if constexpr (learned_bias<std::decay_t<decltype(bias)>>) {
          grad.assign(std::size_t(bias.parameters().size()), S(0));
          expected_grad = grad;
        }
        attention_backward(q.view(), k.view(), v.view(), got.out.view(), d_out.view(), got.lse, bias, options, dq.view(), dk.view(),
                           dv.view(), grad);
        reference_attention_backward(q.view(), k.view(), v.view(), got.out.view(), d_out.view(), got.lse, bias, options, rq.view(),
                                     rk.view(), rv.view(), expected_grad);
        CHECK(relbias_test::max_relative_error<S>(dq.view(), rq.view()) < tolerance<S>());
        CHECK(relbias_test::max_relative_error<S>(dk.view(), rk.view()) < tolerance<S>());
        CHECK(relbias_test::max_relative_error<S>(dv.view(), rv.view()) < tolerance<S>());
        CHECK(values_error<S>(grad, expected_grad) < 10 * tolerance<S>());
      };
      check(alibi<S, true>{heads});
      check(t5_bias);
      check(fire<S>{heads, 7, fire_config{.init_L = 300}});
    }
}

TEST_CASE("sequences: a causal window of one key returns that key's value row", "[sequences]") {
  // Each query sees only itself: P = 1, O = V row, lse = scale q.k + bias(i, i) = scale q.k (ALiBi).
  const auto q = random_tensor<double>(1, 9, 2, 4, 41), k = random_tensor<double>(1, 9, 2, 4, 42),
             v = random_tensor<double>(1, 9, 2, 3, 43);
  const attention_options<double> options{.mask = masking::causal, .sliding_window = 1};
  const auto r = attention(q.view(), k.view(), v.view(), alibi<double>{2}, options);
  for (index_t i = 0; i < 9; ++i)
    for (index_t h = 0; h < 2; ++h) {
      for (index_t d = 0; d < 3; ++d) CHECK(r.out(0, i, h, d) == v(0, i, h, d));
      const double dot = q.view().rows(0, h, i, 1).row(0).dot(k.view().rows(0, h, i, 1).row(0));
      CHECK(r.lse[std::size_t(h * 9 + i)] == Approx(0.5 * dot).margin(1e-15));
    }
}

TEST_CASE("sequences: keys outside the window are never read", "[sequences]") {
  // Four queries at positions 100..103, keys at 60..100, causal window 4: only keys 97..100 (rows
  // 37..40) are visible. NaN in every other key row must not reach the output.
  auto k = random_tensor<double>(1, 41, 1, 8, 52), v = random_tensor<double>(1, 41, 1, 8, 53);
  const auto q = random_tensor<double>(1, 4, 1, 8, 51);
  const attention_options<double> options{.mask = masking::causal, .sliding_window = 4, .q_start = 100, .k_start = 60};
  const auto clean = attention(q.view(), k.view(), v.view(), alibi<double>{1}, options);
  for (index_t row = 0; row < 37; ++row) {
    k.view().rows(0, 0, row, 1).setConstant(std::numeric_limits<double>::quiet_NaN());
    v.view().rows(0, 0, row, 1).setConstant(std::numeric_limits<double>::quiet_NaN());
  }
  const auto r = attention(q.view(), k.view(), v.view(), alibi<double>{1}, options);
  CHECK(relbias_test::max_relative_error<double>(r.out.view(), clean.out.view()) == 0);
  const auto expected = reference_attention(q.view(), k.view().positions(37, 4), v.view().positions(37, 4), alibi<double>{1},
                                            attention_options<double>{.mask = masking::causal, .sliding_window = 4, .q_start = 100, .k_start = 97});
  CHECK(relbias_test::max_relative_error<double>(r.out.view(), expected.out.view()) < 1e-14);
}

TEST_CASE("sequences: bias gradient of a packed, windowed batch against finite differences", "[sequences]") {
  // loss = sum(O o W) through the reference forward; its analytic gradient from the fused backward.
  const std::vector<index_t> cu{0, 6, 7, 18};
  const std::vector<sequence> packed = packed_sequences(cu);
  const attention_options<double> options{.mask = masking::causal, .sliding_window = 4, .sequences = packed, .num_threads = 1};
  const auto q = random_tensor<double>(1, 18, 2, 4, 61), k = random_tensor<double>(1, 18, 2, 4, 62),
             v = random_tensor<double>(1, 18, 2, 4, 63), w = random_tensor<double>(1, 18, 2, 4, 64);
  auto loss = [&](const auto& policy) {
    const auto r = reference_attention(q.view(), k.view(), v.view(), policy, options);
    double sum = 0;
    for (index_t n = 0; n < r.out.size(); ++n) sum += r.out.data()[n] * w.data()[n];
    return sum;
  };
  auto analytic = [&](const auto& policy) {
    const auto r = attention(q.view(), k.view(), v.view(), policy, options);
    tensor<double> dq(1, 18, 2, 4), dk(1, 18, 2, 4), dv(1, 18, 2, 4);
    param_vector<double> grad = param_vector<double>::Zero(policy.parameters().size());
    attention_backward(q.view(), k.view(), v.view(), r.out.view(), w.view(), r.lse, policy, options, dq.view(), dk.view(), dv.view(),
                       relbias_test::as_span(grad));
    return grad;
  };
  const kerple_log<double> kerple{2, 5};
  relbias_test::check_gradients_match(analytic(kerple), relbias_test::numeric_gradient(kerple, loss));
  const fire<double> fire_bias{2, 6, fire_config{.width = 6, .init_L = 3.5}};  // rows below and past L, no tie i == L
  relbias_test::check_gradients_match(analytic(fire_bias), relbias_test::numeric_gradient(fire_bias, loss));
  t5<double> t5_bias{2, masking::causal, 8, 16};
  t5_bias.reset_parameters(4, 1.0);
  relbias_test::check_gradients_match(analytic(t5_bias), relbias_test::numeric_gradient(t5_bias, loss));
}

TEST_CASE("sequences: the factories lay sequences out as documented", "[sequences]") {
  const std::vector<index_t> lengths{3, 0, 5};
  const auto left = padded_sequences(lengths, 5, padding::left);
  REQUIRE(left.size() == 3);
  CHECK((left[0].batch == 0 && left[0].q_begin == 2 && left[0].q_length == 3 && left[0].k_begin == 2 && left[0].q_start == 0));
  CHECK((left[1].q_begin == 5 && left[1].q_length == 0 && left[2].q_begin == 0 && left[2].batch == 2));
  const std::vector<index_t> cu_q{0, 1, 4}, cu_k{2, 10, 10};
  const auto packed = packed_sequences(cu_q, cu_k);
  REQUIRE(packed.size() == 2);
  CHECK((packed[1].batch == 0 && packed[1].q_begin == 1 && packed[1].q_length == 3 && packed[1].k_begin == 10 &&
         packed[1].k_length == 0 && packed[0].k_begin == 2 && packed[0].k_length == 8));
  const std::vector<index_t> filled{6, 0, 9};
  const auto decoding = decoding_sequences(filled, 2, 16);
  CHECK((decoding[0].q_length == 2 && decoding[0].q_start == 4 && decoding[0].k_length == 6 && decoding[0].k_start == 0));
  CHECK((decoding[1].q_length == 0 && decoding[1].k_length == 0 && decoding[2].q_start == 7));
}

TEST_CASE("sequences: every new argument is checked and named", "[sequences]") {
  using Catch::Contains;
  const std::vector<index_t> negative{3, -1}, too_long{3, 9}, decreasing{0, 5, 4}, short_cu{0, 5}, long_cu{0, 5, 9};
  CHECK_THROWS_WITH(padded_sequences(negative, 8), Contains("lengths[1] = -1") && Contains("negative"));
  CHECK_THROWS_WITH(padded_sequences(too_long, 8), Contains("lengths[1] = 9") && Contains("padded_length = 8"));
  CHECK_THROWS_WITH(padded_sequences(too_long, -2), Contains("padded_length") && Contains("-2"));
  CHECK_THROWS_WITH(packed_sequences(decreasing), Contains("cu_seqlens_q[2] = 4 < cu_seqlens_q[1] = 5") && Contains("overlap"));
  CHECK_THROWS_WITH(packed_sequences(short_cu, long_cu), Contains("cu_seqlens_k") && Contains("2 and 3"));
  CHECK_THROWS_WITH(packed_sequences(std::vector<index_t>{-3, 4}), Contains("cu_seqlens_q[0] = -3"));
  CHECK_THROWS_WITH(decoding_sequences(too_long, 1, 8), Contains("key_lengths[1] = 9") && Contains("capacity 8"));
  CHECK_THROWS_WITH(decoding_sequences(negative, 1, 8), Contains("key_lengths[1] = -1"));
  CHECK_THROWS_WITH(decoding_sequences(too_long, 4, 16), Contains("key_lengths[0] = 3") && Contains("query_length = 4"));
  CHECK_THROWS_WITH(decoding_sequences(too_long, 0, 16), Contains("query_length") && Contains("0"));

  const auto q = random_tensor<float>(2, 6, 2, 4, 1), k = random_tensor<float>(2, 8, 2, 4, 2), v = random_tensor<float>(2, 8, 2, 4, 3);
  const alibi<float> bias{2};
  auto forward = [&](const std::vector<sequence>& batch, std::optional<index_t> window = {}, index_t q_start = 0) {
    const attention_options<float> options{.sliding_window = window, .q_start = q_start, .sequences = batch};
    return attention(q.view(), k.view(), v.view(), bias, options);
  };
  for (index_t window : {0, -4})
    CHECK_THROWS_WITH(forward({}, window), Contains("options.sliding_window") && Contains(std::to_string(window)));
  const sequence fine{.q_length = 6, .k_length = 8};
  auto with = [&](sequence s) { return std::vector<sequence>{fine, s}; };
  CHECK_THROWS_WITH(forward(with({.batch = 2})), Contains("options.sequences[1].batch") && Contains("[0, 2)") && Contains("got 2"));
  CHECK_THROWS_WITH(forward(with({.batch = 1, .q_length = -1})), Contains("options.sequences[1].q_length") && Contains("-1"));
  CHECK_THROWS_WITH(forward(with({.batch = 1, .k_length = -2})), Contains("options.sequences[1].k_length") && Contains("-2"));
  CHECK_THROWS_WITH(forward(with({.batch = 1, .q_begin = -1, .q_length = 1})), Contains("q_begin") && Contains("-1"));
  CHECK_THROWS_WITH(forward(with({.batch = 1, .q_begin = 2, .q_length = 5})), Contains("query rows [2, 7)") && Contains("q.seq = 6"));
  CHECK_THROWS_WITH(forward(with({.batch = 1, .k_length = 9})), Contains("key rows [0, 9)") && Contains("k.seq") && Contains("= 8"));
  CHECK_THROWS_WITH(forward({fine}), Contains("batch element 1 of 2 holds no sequence"));
  CHECK_THROWS_WITH(forward({fine, {.batch = 0, .q_begin = 5, .q_length = 1}, {.batch = 1}}),
                    Contains("options.sequences[0] and options.sequences[1] overlap in the query rows") && Contains("[5, 6)"));
  CHECK_THROWS_WITH(forward({{.q_length = 2, .k_length = 4}, {.q_begin = 2, .k_begin = 3, .k_length = 2}, {.batch = 1}}),
                    Contains("overlap in the key rows of batch element 0") && Contains("[0, 4) and [3, 5)"));
  CHECK_THROWS_WITH(forward(with({.batch = 1}), std::nullopt, 3), Contains("options.q_start") && Contains("q_start = 3"));

  // The same checks guard the reference kernels and both backward passes.
  const attention_options<float> bad{.sliding_window = 0};
  CHECK_THROWS_WITH(reference_attention(q.view(), k.view(), v.view(), bias, bad), Contains("reference_attention") && Contains("sliding_window"));
  tensor<float> o(2, 6, 2, 4), dq(2, 6, 2, 4), dk(2, 8, 2, 4), dv(2, 8, 2, 4);
  std::vector<float> lse(24);
  CHECK_THROWS_WITH(attention_backward(q.view(), k.view(), v.view(), o.view(), o.view(), lse, bias, bad, dq.view(), dk.view(), dv.view()),
                    Contains("attention_backward") && Contains("sliding_window"));
  CHECK_THROWS_WITH(reference_attention_backward(q.view(), k.view(), v.view(), o.view(), o.view(), lse, bias, bad, dq.view(), dk.view(),
                                                 dv.view()),
                    Contains("reference_attention_backward") && Contains("sliding_window"));
}

TEMPLATE_TEST_CASE("sequences: a padded prefill gives each sequence the bits it gives alone, default tiles, two threads",
                   "[sequences][promises]", float, double) {
  using S = TestType;
  // 257 rows: a 1-row remainder after a 256-row tile, a sequence that 512-row tiles cut differently.
  const index_t padded = 300;
  const std::vector<index_t> lengths{300, 257, 7, 0, 1};
  const auto batch_size = index_t(lengths.size());
  const auto q = random_tensor<S>(batch_size, padded, heads, dim, 41), k = random_tensor<S>(batch_size, padded, kv_heads, dim, 42),
             v = random_tensor<S>(batch_size, padded, kv_heads, dim_v, 43);
  const std::vector<sequence> sequences = padded_sequences(lengths, padded);
  for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{50}})
    for_each_policy<S>(masking::causal, [&](const auto& bias, bool) {
      INFO("window " << window_text(window) << ", policy " << typeid(bias).name());
      const attention_options<S> options{.mask = masking::causal, .sliding_window = window, .sequences = sequences, .num_threads = 2};
      const auto batch = attention(q.view(), k.view(), v.view(), bias, options);
      for (index_t b = 0; b < batch_size; ++b) {
        const index_t n = lengths[std::size_t(b)];
        if (n == 0) continue;
        attention_options<S> own = options;
        own.sequences = {};
        const auto alone = attention(copy_rows(q, b, 0, n).view(), copy_rows(k, b, 0, n).view(), copy_rows(v, b, 0, n).view(), bias, own);
        INFO("sequence " << b);
        CHECK(rows_error(batch.out, b, 0, alone.out, 0, 0, n) == 0);
        for (index_t h = 0; h < heads; ++h)
          CHECK(values_error<S>(std::span(batch.lse).subspan(std::size_t((b * heads + h) * padded), std::size_t(n)),
                                std::span(alone.lse).subspan(std::size_t(h * n), std::size_t(n))) == 0);
      }
    });
}

TEST_CASE("sequences: options own the list a builder returns", "[sequences][promises]") {
  // The natural line: the builder's temporary is gone after it (a span kept it: ASan reported a
  // heap-use-after-free in detail/layout.hpp).
  const std::vector<index_t> lengths{6, 3};
  attention_options<float> options{.mask = masking::causal};
  options.sequences = padded_sequences(lengths, 6, padding::left);
  const std::vector<std::vector<sequence>> reuse(16, std::vector<sequence>(2, sequence{.batch = 7, .q_begin = 9}));
  REQUIRE(options.sequences.size() == 2);
  CHECK((options.sequences[1].batch == 1 && options.sequences[1].q_begin == 3 && options.sequences[1].q_length == 3 &&
         options.sequences[1].k_begin == 3 && options.sequences[1].k_length == 3));
  const auto q = random_tensor<float>(2, 6, 2, 4, 51), k = random_tensor<float>(2, 6, 2, 4, 52), v = random_tensor<float>(2, 6, 2, 4, 53);
  const alibi<float> bias{2};
  const std::vector<sequence> kept = padded_sequences(lengths, 6, padding::left);
  attention_options<float> with_kept{.mask = masking::causal};
  with_kept.sequences = kept;
  const auto got = attention(q.view(), k.view(), v.view(), bias, options), expected = attention(q.view(), k.view(), v.view(), bias, with_kept);
  CHECK(rows_error(got.out, 1, 0, expected.out, 1, 0, 6) == 0);
  CHECK(rows_error(got.out, 0, 0, expected.out, 0, 0, 6) == 0);
}

TEST_CASE("sequences: errors name the array the builder was given", "[sequences][promises]") {
  using Catch::Contains;
  const auto q = random_tensor<float>(2, 6, 2, 4, 61), k = random_tensor<float>(2, 8, 2, 4, 62), v = random_tensor<float>(2, 8, 2, 4, 63);
  const alibi<float> bias{2};
  auto forward = [&](sequence_list batch) {
    const attention_options<float> options{.sequences = std::move(batch)};
    return attention(q.view(), k.view(), v.view(), bias, options);
  };
  const std::vector<index_t> three{6, 6, 6}, one{6}, cu{0, 4, 9}, cached{9, 0};
  CHECK_THROWS_WITH(forward(padded_sequences(three, 6)), Contains("lengths has 3 entries") && Contains("q holds 2 batch elements") &&
                                                             !Contains("options.sequences"));
  CHECK_THROWS_WITH(forward(padded_sequences(one, 6)), Contains("batch element 1 of 2 holds no sequence (lengths has 1 entries"));
  const auto q1 = random_tensor<float>(1, 6, 2, 4, 64), k1 = random_tensor<float>(1, 8, 2, 4, 65), v1 = random_tensor<float>(1, 8, 2, 4, 66);
  const attention_options<float> packed{.sequences = packed_sequences(cu)};
  CHECK_THROWS_WITH(attention(q1.view(), k1.view(), v1.view(), bias, packed),
                    Contains("cu_seqlens[2] = 9: query rows [4, 9) exceed q.seq = 6") && !Contains("options.sequences"));
  const std::vector<index_t> cu_q{0, 2, 6}, cu_k{0, 4, 10};
  const attention_options<float> cross{.sequences = packed_sequences(cu_q, cu_k)};
  CHECK_THROWS_WITH(attention(q1.view(), k1.view(), v1.view(), bias, cross), Contains("cu_seqlens_k[2] = 10: key rows [4, 10) exceed k.seq"));
  CHECK_THROWS_WITH(forward(decoding_sequences(cached, 1, 9)), Contains("key_lengths[0] = 9: key rows [0, 9) exceed k.seq"));
}

TEMPLATE_TEST_CASE("sequences: a NaN value reaches the rows that see its key and their strip, no other row", "[sequences][promises]",
                   float, double) {
  using S = TestType;
  // Causal, window 4: key 5 is seen by rows 5 .. 8. A NaN in its value makes those rows NaN, and
  // may make the other rows of their 8-row strips NaN (P V multiplies their weight 0 by it:
  // README, "Errors"); rows of other strips stay finite. A NaN in its key stays in its rows.
  const index_t length = 24;
  const auto q = random_tensor<S>(1, length, heads, dim, 71);
  for (bool in_value : {true, false}) {
    auto k = random_tensor<S>(1, length, kv_heads, dim, 72), v = random_tensor<S>(1, length, kv_heads, dim_v, 73);
    (in_value ? v : k).view().rows(0, 0, 5, 1).setConstant(std::numeric_limits<S>::quiet_NaN());
    const attention_options<S> options{.mask = masking::causal, .sliding_window = 4, .num_threads = 1};
    const auto got = attention(q.view(), k.view(), v.view(), alibi<S>{heads}, options);
    auto row_has_nan = [&](index_t r) { return got.out.view().rows(0, 0, r, 1).hasNaN(); };
    INFO((in_value ? "NaN in v" : "NaN in k"));
    for (index_t r = 5; r <= 8; ++r) CHECK(row_has_nan(r));
    for (index_t r = 16; r < length; ++r) CHECK_FALSE(row_has_nan(r));
    if (!in_value)
      for (index_t r : {0, 1, 2, 3, 4, 9, 10, 15}) CHECK_FALSE(row_has_nan(r));
  }
}
