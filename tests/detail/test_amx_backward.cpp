// The backward over 16-bit storage (attention_half.hpp): the widening fallback, bit for bit the
// float backward on the widened tensors (runs everywhere), and the bf16 backward on AMX
// (detail/amx_backward.hpp) against the float reference backward on the widened inputs, within
// the bound from bf16's unit roundoff u = 2^-8 (skipped with a WARN where AMX is not usable).
//
// The bound (docs/storage.md): q, k, v and d_out are bf16 values here and o the float reference's
// output, so the kernel rounds only P (for dV) and dS (for dK and dQ), each element by a factor
// 1 + e, |e| <= u; with W_ij = P_ij (sum_d |dO_id V_jd| + sum_d |dO_id O_id|) >= |dS_ij| (the
// magnitudes of dP and D before their cancellation, which float rounding sees), element by element
//   |dV_jd error| <= u sum_i P_ij |dO_id| + float,
//   |dK_jd error| <= u scale sum_i W_ij |Q_id| + float,   |dQ_id error| <= u scale sum_j W_ij |K_jd| + float,
// the sums over the group's query heads for dK and dV; "float" is 2e-5 (M + 1) with M the sum
// beside u (float sums of up to a few hundred terms, exp within 3e-7). The bias gradient sums the
// float dS: no bf16 rounding enters it, and it is checked within 1e-4 of its largest element.
#include "catch.hpp"
#include "amx_testing.hpp"
#include "random_tensors.hpp"

#include <relbias/attention_backward.hpp>
#include <relbias/attention_half.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/attention_reference_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/t5.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using namespace relbias;
using relbias_test::amx_or_skip;
using relbias_test::bound_check;
using relbias_test::copy_as;
using relbias_test::random_tensor;
using shape = relbias_test::amx_shape;

namespace {

constexpr double float_tolerance = 2e-5;

struct gradients {
  tensor<float> dq, dk, dv;
  std::vector<float> bias_grad;
};

template <class Bias>
gradients empty_gradients(const shape& c, const Bias& bias) {
  gradients g{tensor<float>(c.batch, c.lq, c.hq, c.dim), tensor<float>(c.batch, c.lk, c.hk, c.dim),
              tensor<float>(c.batch, c.lk, c.hk, c.dim_v), {}};
  if constexpr (learned_bias<Bias>) g.bias_grad.assign(std::size_t(bias.parameters().size()), 0.0f);
  return g;
}

bool same_bits(const tensor<float>& a, const tensor<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0;
}

bool same_bits(const gradients& a, const gradients& b) {
  return same_bits(a.dq, b.dq) && same_bits(a.dk, b.dk) && same_bits(a.dv, b.dv) && a.bias_grad == b.bias_grad;
}

/// Random bf16 q, k, v, d_out of a shape, their float copies, and the float reference forward.
struct problem {
  tensor<Eigen::bfloat16> q, k, v, d_out;
  tensor<float> qf, kf, vf, d_outf;
  attention_result<float> forward;

  template <class Bias>
  problem(const shape& c, const Bias& bias, const attention_options<float>& options, std::uint64_t seed)
      : q(copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lq, c.hq, c.dim, seed))),
        k(copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim, seed + 1))),
        v(copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lk, c.hk, c.dim_v, seed + 2))),
        d_out(copy_as<Eigen::bfloat16>(random_tensor<float>(c.batch, c.lq, c.hq, c.dim_v, seed + 3))),
        qf(copy_as<float>(q)), kf(copy_as<float>(k)), vf(copy_as<float>(v)), d_outf(copy_as<float>(d_out)),
        forward(reference_attention(qf.view(), kf.view(), vf.view(), bias, options)) {}

  template <class Bias>
  gradients run(const shape& c, const Bias& bias, const attention_options<float>& options) const {
    gradients g = empty_gradients(c, bias);
    attention_backward(q.view(), k.view(), v.view(), forward.out.view(), d_out.view(), std::span<const float>(forward.lse), bias, options,
                       g.dq.view(), g.dk.view(), g.dv.view(), std::span<float>(g.bias_grad));
    return g;
  }

  template <class Bias>
  gradients reference(const shape& c, const Bias& bias, const attention_options<float>& options) const {
    gradients g = empty_gradients(c, bias);
    reference_attention_backward(qf.view(), kf.view(), vf.view(), forward.out.view(), d_outf.view(), std::span<const float>(forward.lse),
                                 bias, options, g.dq.view(), g.dk.view(), g.dv.view(), std::span<float>(g.bias_grad));
    return g;
  }
};

/// The magnitudes M of the bound above, per element of dq, dk, dv.
struct magnitudes {
  tensor<float> dq, dk, dv;
};

template <class Bias>
magnitudes bound_magnitudes(const problem& pr, const shape& c, const Bias& bias, const attention_options<float>& options) {
  magnitudes m{tensor<float>(c.batch, c.lq, c.hq, c.dim), tensor<float>(c.batch, c.lk, c.hk, c.dim),
               tensor<float>(c.batch, c.lk, c.hk, c.dim_v)};
  for (tensor<float>* t : {&m.dq, &m.dk, &m.dv}) std::fill(t->data(), t->data() + t->size(), 0.0f);
  const detail::batch_layout layout = detail::make_layout(options, c.batch, c.lq, c.lk);
  const double scale = options.scale_for(c.dim);
  for (const sequence& s : layout.sequences)
    for (index_t h = 0; h < c.hq; ++h) {
      const index_t hk = h / (c.hq / c.hk), b = s.batch;
      Eigen::VectorXf lse(s.q_length);
      const detail::row_matrix<float> p = detail::reference_probabilities(pr.qf.view(), pr.kf.view(), bias, options, s, h, lse);
      for (index_t r = 0; r < s.q_length; ++r) {
        const index_t row = s.q_begin + r;
        double delta = 0;  // sum |dO_d O_d| >= |D|
        for (index_t d = 0; d < c.dim_v; ++d) delta += std::abs(double(pr.d_outf(b, row, h, d)) * pr.forward.out(b, row, h, d));
        for (index_t col = 0; col < s.k_length; ++col) {
          const double pij = p(r, col);
          if (pij == 0) continue;
          const index_t key = s.k_begin + col;
          double dp = 0;  // sum |dO_d V_d| >= |dP|
          for (index_t d = 0; d < c.dim_v; ++d) dp += std::abs(double(pr.d_outf(b, row, h, d)) * pr.vf(b, key, hk, d));
          const double w = pij * (dp + delta);
          for (index_t d = 0; d < c.dim_v; ++d) m.dv(b, key, hk, d) += float(pij * std::abs(pr.d_outf(b, row, h, d)));
          for (index_t d = 0; d < c.dim; ++d) {
            m.dk(b, key, hk, d) += float(scale * w * std::abs(pr.qf(b, row, h, d)));
            m.dq(b, row, h, d) += float(scale * w * std::abs(pr.kf(b, key, hk, d)));
          }
        }
      }
    }
  return m;
}

void check_tensor(const tensor<float>& got, const tensor<float>& expected, const tensor<float>& magnitude, bound_check& result) {
  const double u = unit_roundoff<Eigen::bfloat16>();
  for (index_t n = 0; n < got.size(); ++n) {
    const double error = std::abs(double(got.data()[n]) - expected.data()[n]), mag = magnitude.data()[n];
    const double bound = u * mag + float_tolerance * (mag + 1);
    result.worst_ratio = std::max(result.worst_ratio, std::isnan(error) ? INFINITY : error / bound);
    result.worst_error = std::max(result.worst_error, error);
  }
}

/// The bf16 backward of random bf16 inputs against the float reference, within the bound.
template <class Bias>
bound_check bf16_backward_error(const Bias& bias, const shape& c, attention_options<float> options, std::uint64_t seed = 1) {
  const problem pr(c, bias, options, seed);
  const gradients expected = pr.reference(c, bias, options);
  options.compute = compute_precision::bf16;
  const gradients got = pr.run(c, bias, options);
  const magnitudes m = bound_magnitudes(pr, c, bias, options);
  bound_check result;
  check_tensor(got.dq, expected.dq, m.dq, result);
  check_tensor(got.dk, expected.dk, m.dk, result);
  check_tensor(got.dv, expected.dv, m.dv, result);
  double largest = 1;
  for (const float g : expected.bias_grad) largest = std::max(largest, double(std::abs(g)));
  for (std::size_t n = 0; n < got.bias_grad.size(); ++n) {
    const double error = std::abs(double(got.bias_grad[n]) - expected.bias_grad[n]);
    result.worst_ratio = std::max(result.worst_ratio, std::isnan(error) ? INFINITY : error / (1e-4 * largest));
  }
  return result;
}

}  // namespace

TEST_CASE("16-bit backward: without AMX or with fp32 compute, the float backward of the widened tensors, bit for bit", "[amx]") {
  const shape c{2, 37, 41, 4, 2, 24, 16};
  t5<float> bias{4, masking::causal, 32, 128};
  bias.reset_parameters(5, 64.0);
  const attention_options<float> fp32{.mask = masking::causal, .q_start = 4, .num_threads = 2};
  const problem pr(c, bias, fp32, 81);
  gradients expected = empty_gradients(c, bias);
  attention_backward(pr.qf.view(), pr.kf.view(), pr.vf.view(), pr.forward.out.view(), pr.d_outf.view(), pr.forward.lse, bias, fp32,
                     expected.dq.view(), expected.dk.view(), expected.dv.view(), expected.bias_grad);
  CHECK(same_bits(pr.run(c, bias, fp32), expected));
  auto bf16 = fp32;
  bf16.compute = compute_precision::bf16;
  const bool was_disabled = detail::amx::disabled_flag().load();
  detail::amx::set_disabled(true);
  CHECK(same_bits(pr.run(c, bias, bf16), expected));
  detail::amx::set_disabled(was_disabled);

  SECTION("half storage, float q, o and d_out in the storage format") {
    const auto q = copy_as<Eigen::half>(pr.qf), k = copy_as<Eigen::half>(pr.kf), v = copy_as<Eigen::half>(pr.vf);
    const auto o = copy_as<Eigen::half>(pr.forward.out), d_out = copy_as<Eigen::half>(pr.d_outf);
    gradients widened = empty_gradients(c, bias), got = empty_gradients(c, bias);
    attention_backward(copy_as<float>(q).view(), copy_as<float>(k).view(), copy_as<float>(v).view(), copy_as<float>(o).view(),
                       copy_as<float>(d_out).view(), pr.forward.lse, bias, fp32, widened.dq.view(), widened.dk.view(), widened.dv.view(),
                       widened.bias_grad);
    attention_backward(q.view(), k.view(), v.view(), o.view(), d_out.view(), std::span<const float>(pr.forward.lse), bias, bf16,
                       got.dq.view(), got.dk.view(), got.dv.view(), std::span<float>(got.bias_grad));
    CHECK(same_bits(got, widened));
    gradients float_q = empty_gradients(c, bias);
    attention_backward(pr.qf.view(), k.view(), v.view(), pr.forward.out.view(), pr.d_outf.view(), std::span<const float>(pr.forward.lse),
                       bias, fp32, float_q.dq.view(), float_q.dk.view(), float_q.dv.view(), std::span<float>(float_q.bias_grad));
    gradients float_q_expected = empty_gradients(c, bias);
    attention_backward(pr.qf.view(), copy_as<float>(k).view(), copy_as<float>(v).view(), pr.forward.out.view(), pr.d_outf.view(),
                       pr.forward.lse, bias, fp32, float_q_expected.dq.view(), float_q_expected.dk.view(), float_q_expected.dv.view(),
                       float_q_expected.bias_grad);
    CHECK(same_bits(float_q, float_q_expected));
  }
}

TEST_CASE("16-bit backward: bad arguments throw std::invalid_argument naming them, on the caller's tensors", "[amx]") {
  const shape c{1, 4, 6, 2, 2, 8, 8};
  const alibi<float> bias{2};
  const problem pr(c, bias, {}, 91);
  gradients g = empty_gradients(c, bias);
  tensor<float> small(1, 4, 2, 7);
  const std::span<const float> lse(pr.forward.lse);
  for (const compute_precision compute : {compute_precision::fp32, compute_precision::bf16}) {
    const attention_options<float> options{.compute = compute};
    CHECK_THROWS_WITH(attention_backward(pr.q.view(), pr.k.view(), pr.v.view(), small.view(), pr.d_out.view(), lse, bias, options,
                                         g.dq.view(), g.dk.view(), g.dv.view()),
                      Catch::Contains("o must have shape"));
    CHECK_THROWS_WITH(attention_backward(pr.q.view(), pr.k.view(), pr.v.view(), pr.forward.out.view(), pr.d_outf.view(), lse.first(3),
                                         bias, options, g.dq.view(), g.dk.view(), g.dv.view()),
                      Catch::Contains("lse must hold"));
    std::vector<float> grad(3);
    CHECK_THROWS_WITH(attention_backward(pr.q.view(), pr.k.view(), pr.v.view(), pr.forward.out.view(), pr.d_outf.view(), lse, bias,
                                         options, g.dq.view(), g.dk.view(), g.dv.view(), std::span<float>(grad)),
                      Catch::Contains("bias_grad"));
    // dq over the caller's o: caught although the kernel would only see float copies
    tensor<float> o = pr.forward.out;
    CHECK_THROWS_WITH(attention_backward(pr.q.view(), pr.k.view(), pr.v.view(), o.view(), pr.d_outf.view(), lse, bias, options,
                                         o.view(), g.dk.view(), g.dv.view()),
                      Catch::Contains("dq"));
  }
}

TEST_CASE("amx backward: dq, dk, dv within the bound over tile edges, masks and GQA", "[amx]") {
  if (!amx_or_skip()) return;
  const no_bias<float> none{4};
  const alibi<float> alibi_bias{4};
  for (const index_t length : {1, 15, 17, 33, 129}) {
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      INFO("L = " << length << ", causal = " << (mask == masking::causal));
      const attention_options<float> options{.mask = mask};
      const shape mha{1, length, length, 4, 4, 64, 64}, gqa{2, length, length + 3, 4, 2, 20, 8};  // D = 20, Dv = 8: padded tiles
      const shape deep{1, length, length + 40, 4, 1, 72, 80};                                    // 3 chunks of depth, Dv 3 strips
      CHECK(bf16_backward_error(none, mha, options).worst_ratio <= 1.0);
      CHECK(bf16_backward_error(alibi_bias, gqa, options).worst_ratio <= 1.0);
      CHECK(bf16_backward_error(alibi_bias, deep, options).worst_ratio <= 1.0);
    }
  }
  // The bound is the format's, not float's: at L = 129 the rounding of P and dS shows.
  const bound_check full = bf16_backward_error(none, shape{1, 129, 129, 4, 4, 64, 64}, {});
  CHECK(full.worst_error > 1e-4);
  WARN("L = 129, no bias: largest error " << full.worst_error << ", " << full.worst_ratio << " of the bound");
}

TEST_CASE("amx backward: learned policies with their gradients, windows, packed sequences, KV offsets", "[amx]") {
  if (!amx_or_skip()) return;
  t5<float> t5_bidirectional{4, masking::bidirectional, 32, 128}, t5_causal{4, masking::causal, 32, 128};
  t5_bidirectional.reset_parameters(3, 64.0);
  t5_causal.reset_parameters(4, 64.0);
  const kerple_power<float> power{4, 5};
  const kerple_log<float> log_bias{4, 6};
  const fire<float> fire_bias{4, 7};
  const shape gqa{1, 100, 140, 4, 2, 32, 32};  // two query blocks, two key tiles (the second partial)
  for (const masking mask : {masking::bidirectional, masking::causal}) {
    INFO("causal = " << (mask == masking::causal));
    const attention_options<float> options{.mask = mask, .q_start = 20};
    CHECK(bf16_backward_error(mask == masking::causal ? t5_causal : t5_bidirectional, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_backward_error(power, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_backward_error(log_bias, gqa, options).worst_ratio <= 1.0);
    CHECK(bf16_backward_error(fire_bias, gqa, options).worst_ratio <= 1.0);
    const attention_options<float> window{.mask = mask, .sliding_window = 45};
    CHECK(bf16_backward_error(power, gqa, window).worst_ratio <= 1.0);
  }
  SECTION("packed sequences with padding rows and keys at rows that are no multiple of 32") {
    const std::vector<sequence> sequences{{0, 0, 70, 3, 90, 20, 0}, {0, 75, 40, 95, 35, 0, 0}, {1, 10, 100, 7, 120, 0, 0}};
    const attention_options<float> options{.mask = masking::causal, .sequences = sequences};
    const shape packed{2, 130, 130, 4, 2, 64, 64};
    CHECK(bf16_backward_error(log_bias, packed, options).worst_ratio <= 1.0);
    CHECK(bf16_backward_error(t5_causal, packed, options).worst_ratio <= 1.0);
    CHECK(bf16_backward_error(fire_bias, packed, options).worst_ratio <= 1.0);
  }
}

TEST_CASE("amx backward: the same bits for any thread count; rows that see no key get zero gradients", "[amx]") {
  if (!amx_or_skip()) return;
  t5<float> bias{4, masking::causal, 32, 128};
  bias.reset_parameters(6, 64.0);
  const shape c{2, 150, 160, 4, 2, 64, 64};
  attention_options<float> options{.mask = masking::causal, .k_start = 30, .num_threads = 1, .compute = compute_precision::bf16};
  const problem pr(c, bias, options, 101);
  const gradients one = pr.run(c, bias, options);
  options.num_threads = 3;
  CHECK(same_bits(one, pr.run(c, bias, options)));
  // 18 items: two waves of bias-gradient partials (bf16_backward_wave = 16)
  const shape many{9, 20, 24, 4, 2, 32, 32};
  attention_options<float> shifted{.mask = masking::causal, .q_start = 10, .num_threads = 1, .compute = compute_precision::bf16};
  const problem wide(many, bias, shifted, 102);
  const gradients single = wide.run(many, bias, shifted);
  CHECK(single.bias_grad != std::vector<float>(single.bias_grad.size(), 0.0f));
  shifted.num_threads = 3;
  CHECK(same_bits(single, wide.run(many, bias, shifted)));
  CHECK(bf16_backward_error(bias, many, {.mask = masking::causal, .q_start = 10}).worst_ratio <= 1.0);
  // Query positions 0..29 see no key (keys start at 30): their dq rows are 0.
  CHECK(one.dq(0, 5, 3, 7) == 0.0f);
  CHECK(one.dq(1, 29, 0, 0) == 0.0f);
  CHECK(one.dq(1, 40, 0, 0) != 0.0f);  // (position 30 sees one key: P = 1, dS = dP - D = 0)
}
