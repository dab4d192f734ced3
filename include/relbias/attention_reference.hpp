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

/// Softmax probabilities P (Lq, Lk) of head h in batch b, and the row log-sum-exp (Lq).
/// A row with no visible key gets P = 0 and lse = -inf.
template <bias_policy Bias, class S = typename Bias::scalar_type>
row_matrix<S> reference_probabilities(const input_tensor<S>& q, const input_tensor<S>& k, const Bias& bias,
                                      const attention_options<S>& options, index_t b, index_t h,
                                      Eigen::Matrix<S, Eigen::Dynamic, 1>& lse) {
  const index_t group = q.heads / k.heads;
  row_matrix<S> p = options.scale_for(q.dim) * (q.matrix(b, h) * k.matrix(b, h / group).transpose());  // (Lq, Lk)
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  for (index_t r = 0; r < p.rows(); ++r) {
    const index_t i = query_position(options.q_start, r);
    for (index_t c = 0; c < p.cols(); ++c) {
      const index_t j = key_position(options.k_start, c);
      p(r, c) = is_masked(options.mask, i, j) ? minus_inf : p(r, c) + bias(h, i, j);
    }
    const S row_max = p.row(r).maxCoeff();
    if (row_max == minus_inf) {  // no visible key
      p.row(r).setZero();
      lse[r] = minus_inf;
      continue;
    }
    p.row(r) = (p.row(r).array() - row_max).exp().matrix();
    // Exact zeros where masked: Eigen's exp(-inf) is a subnormal in double, not 0.
    const index_t visible = visible_key_count(options.mask, i, options.k_start, p.cols());
    p.row(r).tail(p.cols() - visible).setZero();
    const S sum = p.row(r).sum();
    p.row(r) /= sum;
    lse[r] = row_max + std::log(sum);
  }
  return p;
}

}  // namespace detail

/// Reference forward. q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (Hq a multiple of
/// Hk), o [B, Lq, Hq, Dv]; lse, if not empty, receives B * Hq * Lq values laid out [b][h][row].
template <bias_policy Bias, class S = typename Bias::scalar_type>
void reference_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias,
                         const attention_options<S>& options, output_tensor<S> o, output_span<S> lse = {}) {
  // Preconditions
  constexpr const char* where = "relbias::reference_attention";
  detail::check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  detail::check_outputs(where, q, v, o, lse, false);

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
  attention_result<S> result{tensor<S>(q.batch, q.seq, q.heads, v.dim), std::vector<S>(std::size_t(q.batch * q.heads * q.seq))};
  reference_attention(q, k, v, bias, options, result.out.view(), std::span<S>(result.lse));
  return result;
}

}  // namespace relbias
