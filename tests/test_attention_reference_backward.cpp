// Every gradient of the reference backward against central finite differences, in double.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_reference.hpp>
#include <relbias/attention_reference_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/t5.hpp>

#include <cmath>
#include <functional>
#include <vector>

using namespace relbias;
using relbias_test::random_tensor;

namespace {

struct fd_problem {
  index_t lq = 5, lk = 7, hq = 4, hk = 2, dim = 3;
  tensor<double> q = random_tensor<double>(1, lq, hq, dim, 21), k = random_tensor<double>(1, lk, hk, dim, 22),
                 v = random_tensor<double>(1, lk, hk, dim, 23), weights = random_tensor<double>(1, lq, hq, dim, 24);
};

/// L = sum(W o O).
template <class Bias>
double loss(const fd_problem& p, const Bias& bias, const attention_options<double>& options) {
  const auto r = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  double sum = 0;
  for (index_t n = 0; n < r.out.size(); ++n) sum += r.out.data()[n] * p.weights.data()[n];
  return sum;
}

/// Central difference of f over each of n values at `values`, against `analytic`.
void check_against_differences(double* values, index_t n, const double* analytic, const std::function<double()>& f) {
  for (index_t m = 0; m < n; ++m) {
    const double saved = values[m], step = 1e-5 * std::max(1.0, std::abs(saved));
    values[m] = saved + step;
    const double up = f();
    values[m] = saved - step;
    const double down = f();
    values[m] = saved;
    const double numeric = (up - down) / (2 * step);
    INFO("value " << m << ": numeric " << numeric << " analytic " << analytic[m]);
    CHECK(std::abs(numeric - analytic[m]) <= 1e-7 * std::max(1.0, std::abs(numeric)));
  }
}

template <class Bias>
void check_all_gradients(fd_problem& p, Bias bias, const attention_options<double>& options) {
  const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  tensor<double> dq(1, p.lq, p.hq, p.dim), dk(1, p.lk, p.hk, p.dim), dv(1, p.lk, p.hk, p.dim);
  std::vector<double> bias_grad;
  if constexpr (learned_bias<Bias>) bias_grad.assign(std::size_t(bias.parameters().size()), 0.0);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(), forward.lse,
                               bias, options, dq.view(), dk.view(), dv.view(), bias_grad);
  const auto f = [&] { return loss(p, bias, options); };
  check_against_differences(p.q.data(), p.q.size(), dq.data(), f);
  check_against_differences(p.k.data(), p.k.size(), dk.data(), f);
  check_against_differences(p.v.data(), p.v.size(), dv.data(), f);
  if constexpr (learned_bias<Bias>)
    check_against_differences(bias.parameters().data(), bias.parameters().size(), bias_grad.data(), f);
}

template <class MakeBias>
void for_each_mask_and_offset(MakeBias make_bias) {
  for (masking mask : {masking::bidirectional, masking::causal})
    for (auto [q_start, k_start] : {std::pair<index_t, index_t>{2, 0}, {9, 4}}) {
      INFO("mask=" << int(mask) << " q_start=" << q_start << " k_start=" << k_start);
      fd_problem p;
      check_all_gradients(p, make_bias(mask), attention_options<double>{.mask = mask, .q_start = q_start, .k_start = k_start});
    }
}

}  // namespace

TEST_CASE("reference backward: q, k, v and trainable ALiBi slopes against finite differences", "[reference_backward]") {
  for_each_mask_and_offset([](masking) { return alibi<double, true>{4}; });
}

TEST_CASE("reference backward: T5 and per-offset tables against finite differences", "[reference_backward]") {
  for_each_mask_and_offset([](masking mask) {
    t5<double> bias{4, mask, 8, 16};
    bias.reset_parameters(5, 4.0);
    return bias;
  });
  for_each_mask_and_offset([](masking mask) {
    per_offset<double> bias{4, mask, 3};
    bias.reset_parameters(6, 0.5);
    return bias;
  });
}

TEST_CASE("reference backward: KERPLE r1, r2 against finite differences", "[reference_backward]") {
  for_each_mask_and_offset([](masking) { return kerple_power<double>{4, 3}; });
  for_each_mask_and_offset([](masking) { return kerple_log<double>{4, 3}; });
}

TEST_CASE("reference backward: FIRE MLP, c and L multiplier against finite differences", "[reference_backward]") {
  // L = 8.5: query positions 2..6 lie below it, 9..13 above (no tie i == L).
  for_each_mask_and_offset([](masking) { return fire<double>{4, 9, fire_config{.width = 6, .init_L = 8.5}}; });
}

TEST_CASE("reference backward: FIRE's b2 and unused T5 buckets get exactly zero", "[reference_backward]") {
  fd_problem p;
  const attention_options<double> options{.mask = masking::causal, .q_start = 2};
  auto gradient_of = [&](const auto& bias) {
    const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
    tensor<double> dq(1, p.lq, p.hq, p.dim), dk(1, p.lk, p.hk, p.dim), dv(1, p.lk, p.hk, p.dim);
    std::vector<double> grad(std::size_t(bias.parameters().size()), 0.0);
    reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(), forward.lse,
                                 bias, options, dq.view(), dk.view(), dv.view(), grad);
    return grad;
  };
  const fire<double> f{4, 9, fire_config{.width = 6, .init_L = 8.5}};
  const auto fire_grad = gradient_of(f);
  for (index_t h = 0; h < 4; ++h) CHECK(std::abs(fire_grad[std::size_t(f.b2_index() + h)]) < 1e-15);  // softmax row invariance
  t5<double> bias{4, masking::causal, 32, 128};
  bias.reset_parameters(5, 4.0);
  const auto t5_grad = gradient_of(bias);
  // Distances seen: 0..6 -> buckets 0..6; bucket 20 is never used.
  for (index_t h = 0; h < 4; ++h) CHECK(t5_grad[std::size_t(20 * 4 + h)] == 0.0);
}

TEST_CASE("reference backward: a row that sees no key passes no gradient", "[reference_backward]") {
  fd_problem p;
  const attention_options<double> options{.mask = masking::causal, .q_start = 0, .k_start = 3};  // rows 0..2 see nothing
  const alibi<double, true> bias{4};
  const auto forward = reference_attention(p.q.view(), p.k.view(), p.v.view(), bias, options);
  tensor<double> dq(1, p.lq, p.hq, p.dim), dk(1, p.lk, p.hk, p.dim), dv(1, p.lk, p.hk, p.dim);
  std::vector<double> grad(4, 0.0);
  reference_attention_backward(p.q.view(), p.k.view(), p.v.view(), forward.out.view(), p.weights.view(), forward.lse, bias,
                               options, dq.view(), dk.view(), dv.view(), grad);
  for (index_t h = 0; h < p.hq; ++h)
    for (index_t d = 0; d < p.dim; ++d) {
      CHECK(dq(0, 0, h, d) == 0.0);
      CHECK(dq(0, 2, h, d) == 0.0);
    }
  for (double g : grad) CHECK(std::isfinite(g));
  fd_problem fresh;
  check_all_gradients(fresh, bias, options);
}
