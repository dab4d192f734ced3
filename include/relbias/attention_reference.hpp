#pragma once
// The plain reference attention: materialises the (Lq, Lk) score matrix of one head at a time
// with Eigen products. Every faster kernel is tested against it, and benchmarks use it as the
// fair "materialise everything" baseline.
//
//   O = softmax(scale * Q K^T + B + mask) V,   B[r][c] = bias(h, q_start + r, k_start + c)

#include "relbias/attention_options.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/detail/layout.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <algorithm>
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

/// Softmax probabilities P (q_length, k_length) of head h over one sequence, and its rows'
/// log-sum-exp (q_length). The contract every kernel follows (README, "Errors"):
///   hidden keys (causal mask) have P = 0 exactly, and so do keys whose score is -inf;
///   a row with no visible key of finite score gets P = 0 and lse = -inf;
///   a row with a NaN or +inf score among its visible keys gets P = NaN there and lse = NaN.
template <bias_policy Bias, class S = typename Bias::scalar_type>
row_matrix<S> reference_probabilities(const input_tensor<S>& q, const input_tensor<S>& k, const Bias& bias,
                                      const attention_options<S>& options, const sequence& seq, index_t h,
                                      Eigen::Matrix<S, Eigen::Dynamic, 1>& lse) {
  const index_t group = q.heads / k.heads;
  const offset_band band = options.band();
  row_matrix<S> p = options.scale_for(q.dim) * (q.rows(seq.batch, h, seq.q_begin, seq.q_length) *
                                                k.rows(seq.batch, h / group, seq.k_begin, seq.k_length).transpose());  // (Lq, Lk)
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  for (index_t r = 0; r < p.rows(); ++r) {
    const index_t i = query_position(seq.q_start, r);
    for (index_t c = 0; c < p.cols(); ++c) {
      const index_t j = key_position(seq.k_start, c);
      p(r, c) = band.contains(relative_offset(i, j)) ? p(r, c) + bias(h, i, j) : minus_inf;
    }
    const index_range visible = band.visible_keys(i, seq.k_start, p.cols());
    auto scores = p.row(r).segment(visible.begin, visible.size()).array();
    S row_max = visible.empty() ? minus_inf : scores.template maxCoeff<Eigen::PropagateNaN>();
    if (row_max == -minus_inf) row_max = std::numeric_limits<S>::quiet_NaN();  // +inf: no finite softmax
    p.row(r).head(visible.begin).setZero();
    p.row(r).tail(p.cols() - visible.end).setZero();
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
  detail::check_contiguous_keys(where, options);
  detail::check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  detail::check_bias_mode(where, bias, options);
  detail::check_outputs(where, q, v, o, lse, false);
  detail::check_no_aliasing(where, {detail::block_of("o", o), detail::block_of("lse", lse)},
                            {detail::block_of("q", q), detail::block_of("k", k), detail::block_of("v", v), detail::parameter_block(bias)});
  detail::check_sequences(where, q, k, options);

  const index_t group = q.heads / k.heads;
  const detail::batch_layout layout = detail::make_layout(options, q.batch, q.seq, k.seq);
  for (index_t b = 0; b < q.batch; ++b)  // rows outside every sequence: O = 0, lse = -inf
    for (index_t h = 0; h < q.heads; ++h) o.matrix(b, h).setZero();
  if (!lse.empty()) std::fill(lse.begin(), lse.end(), -std::numeric_limits<S>::infinity());
  for (const sequence& seq : layout.sequences)
    for (index_t h = 0; h < q.heads; ++h) {
      Eigen::Matrix<S, Eigen::Dynamic, 1> row_lse(seq.q_length);
      const detail::row_matrix<S> p = detail::reference_probabilities(q, k, bias, options, seq, h, row_lse);  // (Lq, Lk)
      o.rows(seq.batch, h, seq.q_begin, seq.q_length).noalias() = p * v.rows(seq.batch, h / group, seq.k_begin, seq.k_length);
      if (!lse.empty())
        for (index_t r = 0; r < seq.q_length; ++r) lse[std::size_t((seq.batch * q.heads + h) * q.seq + seq.q_begin + r)] = row_lse[r];
    }
}

/// Reference forward returning owning O and lse.
template <bias_policy Bias, class S = typename Bias::scalar_type>
attention_result<S> reference_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v,
                                        const Bias& bias, const attention_options<S>& options = {}) {
  detail::check_contiguous_keys("relbias::reference_attention", options);
  detail::check_qkv("relbias::reference_attention", q, k, v, index_t(bias.num_heads()), options);
  detail::check_result_sizes("relbias::reference_attention", q, v);
  detail::check_sequences("relbias::reference_attention", q, k, options);
  attention_result<S> result{tensor<S>(q.batch, q.seq, q.heads, v.dim), std::vector<S>(std::size_t(q.batch * q.heads * q.seq))};
  reference_attention(q, k, v, bias, options, result.out.view(), std::span<S>(result.lse));
  return result;
}

}  // namespace relbias
