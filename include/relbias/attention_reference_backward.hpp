#pragma once
// The plain reference backward: one head at a time, P rebuilt with the reference forward's
// code, every product with Eigen. The fused backward and every gradient are tested against it
// (and it against finite differences).
//
//   dV = P^T dO      dP = dO V^T      dS = P o (dP - rowsum(dO o O))
//   dQ = scale dS K  dK = scale dS^T Q     dtheta = sum over cells of dS * db/dtheta

#include "relbias/attention_options.hpp"
#include "relbias/attention_reference.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <span>
#include <vector>

namespace relbias {

namespace detail {

/// Adds head h's bias-parameter gradient for one (Lq, Lk) block of dS: along each diagonal for
/// shift-invariant policies, per cell otherwise.
template <differentiable_bias Bias, class S = typename Bias::scalar_type>
void reference_bias_gradient(const Bias& bias, const attention_options<S>& options, index_t h, const row_matrix<S>& ds,
                             std::span<S> grad) {
  const position_window window = options.window(ds.rows(), ds.cols());
  if constexpr (offset_differentiable_bias<Bias>) {
    std::vector<S> by_offset(std::size_t(window.offset_count()), S(0));  // index delta - min_offset
    for (index_t r = 0; r < ds.rows(); ++r)
      for (index_t c = 0; c < ds.cols(); ++c)
        by_offset[std::size_t(relative_offset(query_position(options.q_start, r), key_position(options.k_start, c)) -
                              window.min_offset())] += ds(r, c);
    bias.accumulate_offset_gradient(h, window.min_offset(), by_offset, grad);
  } else {
    for (index_t r = 0; r < ds.rows(); ++r)
      for (index_t c = 0; c < ds.cols(); ++c)
        if (ds(r, c) != S(0))
          bias.accumulate_gradient(h, query_position(options.q_start, r), key_position(options.k_start, c), ds(r, c), grad);
  }
}

}  // namespace detail

/// Reference backward, same contract as attention_backward(): dq, dk, dv overwritten (GQA: dk,
/// dv summed over each group's query heads); bias_grad, laid out like bias.parameters(),
/// accumulated into (+=), or empty to skip.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void reference_attention_backward(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, input_tensor<S> o,
                                  input_tensor<S> d_out, input_span<S> lse, const Bias& bias,
                                  const attention_options<S>& options, output_tensor<S> dq, output_tensor<S> dk,
                                  output_tensor<S> dv, output_span<S> bias_grad = {}) {
  // Preconditions
  constexpr const char* where = "relbias::reference_attention_backward";
  detail::check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  std::size_t parameter_count = 0;
  if constexpr (learned_bias<Bias>) parameter_count = std::size_t(bias.parameters().size());
  detail::check_backward(where, q, k, v, o, d_out, lse, dq, dk, dv, bias_grad.size(), parameter_count);

  const index_t group = q.heads / k.heads;
  const S scale = options.scale_for(q.dim);
  Eigen::Matrix<S, Eigen::Dynamic, 1> row_lse(q.seq);  // (Lq), recomputed with P
  for (index_t b = 0; b < q.batch; ++b) {
    for (index_t hk = 0; hk < k.heads; ++hk) {
      dk.matrix(b, hk).setZero();
      dv.matrix(b, hk).setZero();
    }
    for (index_t h = 0; h < q.heads; ++h) {
      const index_t hk = h / group;
      detail::row_matrix<S> ds = detail::reference_probabilities(q, k, bias, options, b, h, row_lse);  // P (Lq, Lk)
      dv.matrix(b, hk).noalias() += ds.transpose() * d_out.matrix(b, h);                              // (Lk, Dv)
      const detail::row_matrix<S> dp = d_out.matrix(b, h) * v.matrix(b, hk).transpose();              // (Lq, Lk)
      const Eigen::Matrix<S, Eigen::Dynamic, 1> delta =
          (d_out.matrix(b, h).array() * o.matrix(b, h).array()).rowwise().sum();  // (Lq)
      ds = (ds.array() * (dp.colwise() - delta).array()).matrix();               // dS (Lq, Lk)
      dq.matrix(b, h).noalias() = scale * (ds * k.matrix(b, hk));                // (Lq, D)
      dk.matrix(b, hk).noalias() += scale * (ds.transpose() * q.matrix(b, h));   // (Lk, D)
      if constexpr (differentiable_bias<Bias>)
        if (!bias_grad.empty()) detail::reference_bias_gradient(bias, options, h, ds, bias_grad);
    }
  }
}

}  // namespace relbias
