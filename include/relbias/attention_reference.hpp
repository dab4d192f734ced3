#pragma once
// The plain reference attention: materialises the (Lq, Lk) score matrix of one head at a time
// with Eigen products. Every faster kernel is tested against it, and benchmarks use it as the
// fair "materialise everything" baseline.
//
//   O = softmax(scale * Q K^T + B + mask) V,   B[r][c] = bias(h, q_start + r, k_start + c)

#include "relbias/attention_options.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <span>

namespace relbias {

namespace detail {

template <class S>
using row_matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// exp(x) as the true value rounds: Eigen's vectorised exp clamps its argument (float below
/// -88.4 gives 2.9e-39, double below -708.4 a subnormal) where the true value is a smaller
/// subnormal or 0. Those arguments (and -inf) go through the scalar exp, in double for float.
template <class S>
void exact_exp(Eigen::Ref<Eigen::Array<S, 1, Eigen::Dynamic>> x) {
  const S normal_below = std::log(std::numeric_limits<S>::min());  // exp(x) < smallest normal
  const Eigen::Array<S, 1, Eigen::Dynamic> arguments = x;
  x = x.exp();
  for (index_t c = 0; c < x.size(); ++c)
    if (arguments[c] < normal_below) x[c] = S(std::exp(double(arguments[c])));
}

/// Softmax probabilities P (Lq, Lk) of head h in batch b, and the row log-sum-exp (Lq). The
/// contract every kernel follows (README, "Errors"):
///   hidden keys (causal mask) have P = 0 exactly, and so do keys whose score is -inf;
///   a row with no visible key of finite score gets P = 0 and lse = -inf;
///   a row with a NaN or +inf score among its visible keys gets P = NaN there and lse = NaN.
template <bias_policy Bias, class S = typename Bias::scalar_type>
row_matrix<S> reference_probabilities(const input_tensor<S>& q, const input_tensor<S>& k, const Bias& bias,
                                      const attention_options<S>& options, index_t b, index_t h,
                                      Eigen::Matrix<S, Eigen::Dynamic, 1>& lse) {
  const index_t group = q.heads / k.heads;
  row_matrix<S> p = options.scale_for(q.dim) * (q.matrix(b, h) * k.matrix(b, h / group).transpose());  // (Lq, Lk)
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  for (index_t r = 0; r < p.rows(); ++r) {
    const index_t i = query_position(options.q_start, r);
    const index_t visible = visible_key_count(options.mask, i, options.k_start, p.cols());
    for (index_t c = 0; c < visible; ++c) p(r, c) += bias(h, i, key_position(options.k_start, c));
    auto scores = p.row(r).head(visible).array();
    S row_max = visible > 0 ? scores.template maxCoeff<Eigen::PropagateNaN>() : minus_inf;
    if (row_max == -minus_inf) row_max = std::numeric_limits<S>::quiet_NaN();  // +inf: no finite softmax
    p.row(r).tail(p.cols() - visible).setZero();
    if (row_max == minus_inf) {  // no visible key of finite score
      p.row(r).setZero();
      lse[r] = minus_inf;
      continue;
    }
    scores -= row_max;
    exact_exp<S>(scores);
    const S sum = scores.sum();
    scores /= sum;
    lse[r] = row_max + std::log(sum);
  }
  return p;
}

}  // namespace detail

/// Reference forward. q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (Hq a multiple of
/// Hk), o [B, Lq, Hq, Dv]; lse, if not empty, receives B * Hq * Lq values laid out [b][h][row].
/// Same contract as attention() (README, "Errors"), computed plainly: the exact answer.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void reference_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias,
                         const attention_options<S>& options, output_tensor<S> o, output_span<S> lse = {}) {
  // Preconditions
  constexpr const char* where = "relbias::reference_attention";
  detail::check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  detail::check_bias_mode(where, bias, options);
  detail::check_outputs(where, q, v, o, lse, false);
  detail::check_no_aliasing(where, {detail::block_of("o", o), detail::block_of("lse", lse)},
                            {detail::block_of("q", q), detail::block_of("k", k), detail::block_of("v", v), detail::parameter_block(bias)});

  const index_t group = q.heads / k.heads;
  Eigen::Matrix<S, Eigen::Dynamic, 1> row_lse(q.seq);  // (Lq)
  for (index_t b = 0; b < q.batch; ++b)
    for (index_t h = 0; h < q.heads; ++h) {
      const detail::row_matrix<S> p = detail::reference_probabilities(q, k, bias, options, b, h, row_lse);  // (Lq, Lk)
      o.matrix(b, h).noalias() = p * v.matrix(b, h / group);                                           // (Lq, Dv)
      if (!lse.empty())
        for (index_t r = 0; r < q.seq; ++r) lse[std::size_t((b * q.heads + h) * q.seq + r)] = row_lse[r];
    }
}

/// Reference forward returning owning O and lse.
template <bias_policy Bias, class S = typename Bias::scalar_type>
attention_result<S> reference_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v,
                                        const Bias& bias, const attention_options<S>& options = {}) {
  detail::check_qkv("relbias::reference_attention", q, k, v, index_t(bias.num_heads()), options);
  detail::check_result_sizes("relbias::reference_attention", q, v);
  attention_result<S> result{tensor<S>(q.batch, q.seq, q.heads, v.dim), std::vector<S>(std::size_t(q.batch * q.heads * q.seq))};
  reference_attention(q, k, v, bias, options, result.out.view(), std::span<S>(result.lse));
  return result;
}

}  // namespace relbias
