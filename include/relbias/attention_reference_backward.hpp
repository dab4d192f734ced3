#pragma once
// The plain reference backward: one head at a time, P rebuilt by the reference forward's own
// code (detail::reference_probabilities), every product with Eigen. The fused backward is tested
// against it, and it against central finite differences (tests/test_attention_reference_backward.cpp).
//
//   dV = P^T dO      dP = dO V^T      D = rowsum(dO o O)      dS = P o (dP - D)
//   dQ = scale dS K      dK = scale dS^T Q      dtheta = sum over visible cells of dS * db/dtheta
//
// dS is also dL/dB (the bias is added to the scores unscaled), so the bias gradient is dS
// pushed through the policy's chain rule.

#include "relbias/attention_options.hpp"
#include "relbias/attention_reference.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/checks.hpp"
#include "relbias/detail/layout.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <Eigen/Core>

#include <cstddef>
#include <span>
#include <string>
#include <vector>

namespace relbias {

namespace detail {

/// A policy without parameters has no gradient to receive: a non-empty bias_grad is a caller's
/// mistake (it would silently stay untouched), so say so instead of ignoring it.
template <class Bias>
void check_reference_bias_grad(const char* where, std::size_t bias_grad_size) {
  if constexpr (!learned_bias<Bias>)
    if (bias_grad_size != 0)
      fail(where, "bias_grad must be empty: the policy has no learned parameters, got " + std::to_string(bias_grad_size) +
                      " values");
}

/// Shift-invariant policies: sum dS (q_length, k_length) of head h over one sequence along each
/// diagonal i - j, then one call to the policy. by_offset[n] holds the diagonal delta =
/// window.min_offset() + n. Masked cells add their exact zero.
template <offset_differentiable_bias Bias, class S = typename Bias::scalar_type>
void reference_offset_gradient(const Bias& bias, const sequence& seq, index_t h, const row_matrix<S>& ds, std::span<S> grad) {
  const position_window window{seq.q_start, ds.rows(), seq.k_start, ds.cols()};
  std::vector<S> by_offset(std::size_t(window.offset_count()), S(0));
  for (index_t r = 0; r < ds.rows(); ++r)
    for (index_t c = 0; c < ds.cols(); ++c) {
      const index_t delta = relative_offset(query_position(seq.q_start, r), key_position(seq.k_start, c));
      by_offset[std::size_t(delta - window.min_offset())] += ds(r, c);
    }
  bias.accumulate_offset_gradient(h, window.min_offset(), std::span<const S>(by_offset), grad);
}

/// Any other learned policy: the chain rule cell by cell. Masked cells are skipped rather than
/// passed a zero: their dS is 0, and a policy need not be defined (finite) where keys are hidden.
template <cell_differentiable_bias Bias, class S = typename Bias::scalar_type>
void reference_cell_gradient(const Bias& bias, const offset_band& band, const sequence& seq, index_t h,
                             const row_matrix<S>& ds, std::span<S> grad) {
  for (index_t r = 0; r < ds.rows(); ++r) {
    const index_t i = query_position(seq.q_start, r);
    for (index_t c = 0; c < ds.cols(); ++c) {
      const index_t j = key_position(seq.k_start, c);
      if (band.contains(relative_offset(i, j))) bias.accumulate_gradient(h, i, j, ds(r, c), grad);
    }
  }
}

/// Adds head h's share of dL/dtheta for one (Lq, Lk) block of dS; the diagonal path wins when a
/// policy offers both (it is the cheaper one and must agree).
template <class Bias, class S = typename Bias::scalar_type>
void reference_bias_gradient(const Bias& bias, const attention_options<S>& options, const sequence& seq, index_t h,
                             const row_matrix<S>& ds, std::span<S> grad) {
  if (ds.size() == 0) return;
  if constexpr (offset_differentiable_bias<Bias>) {
    reference_offset_gradient(bias, seq, h, ds, grad);
  } else if constexpr (cell_differentiable_bias<Bias>) {
    reference_cell_gradient(bias, options.band(), seq, h, ds, grad);
  } else {
    static_assert(!learned_bias<Bias>, "a learned policy needs accumulate_offset_gradient or accumulate_gradient "
                                       "(see concepts.hpp) for reference_attention_backward to reach its parameters");
  }
}

/// Query head h of one sequence: overwrites its rows of dq, adds its share into dk and dv of its
/// key/value head (GQA: the group's query heads sum there), and into bias_grad if not empty.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void reference_head_backward(const input_tensor<S>& q, const input_tensor<S>& k, const input_tensor<S>& v,
                             const input_tensor<S>& o, const input_tensor<S>& d_out, const Bias& bias,
                             const attention_options<S>& options, const sequence& seq, index_t h, const output_tensor<S>& dq,
                             const output_tensor<S>& dk, const output_tensor<S>& dv, std::span<S> bias_grad) {
  const index_t b = seq.batch, hk = h / (q.heads / k.heads);
  const S scale = options.scale_for(q.dim);
  Eigen::Matrix<S, Eigen::Dynamic, 1> unused_lse(seq.q_length);  // P is rebuilt, not read back from lse
  const row_matrix<S> p = reference_probabilities(q, k, bias, options, seq, h, unused_lse);  // (Lq, Lk)
  const auto d_o = d_out.rows(b, h, seq.q_begin, seq.q_length);                             // (Lq, Dv)
  const auto q_rows = q.rows(b, h, seq.q_begin, seq.q_length);                              // (Lq, D)
  const auto k_rows = k.rows(b, hk, seq.k_begin, seq.k_length);                             // (Lk, D)

  dv.rows(b, hk, seq.k_begin, seq.k_length).noalias() += p.transpose() * d_o;              // (Lk, Dv)
  const row_matrix<S> dp = d_o * v.rows(b, hk, seq.k_begin, seq.k_length).transpose();      // (Lq, Lk)
  const Eigen::Matrix<S, Eigen::Dynamic, 1> row_delta =
      (d_o.array() * o.rows(b, h, seq.q_begin, seq.q_length).array()).rowwise().sum();       // (Lq)
  // A row without visible keys has P = 0, so its dS row is exactly 0: no gradient, no NaN.
  row_matrix<S> ds = (p.array() * (dp.colwise() - row_delta).array()).matrix();            // (Lq, Lk)
  for (index_t r = 0; r < ds.rows(); ++r) {  // hidden keys get dS = 0, even from a NaN row
    const index_range visible = options.band().visible_keys(query_position(seq.q_start, r), seq.k_start, ds.cols());
    ds.row(r).head(visible.begin).setZero();
    ds.row(r).tail(ds.cols() - visible.end).setZero();
  }

  dq.rows(b, h, seq.q_begin, seq.q_length).noalias() = scale * (ds * k_rows);              // (Lq, D)
  dk.rows(b, hk, seq.k_begin, seq.k_length).noalias() += scale * (ds.transpose() * q_rows); // (Lk, D)
  if constexpr (learned_bias<Bias>)
    if (!bias_grad.empty()) reference_bias_gradient(bias, options, seq, h, ds, bias_grad);
}

}  // namespace detail

/// Reference backward of reference_attention(), same contract as attention_backward().
///   q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (Hk divides Hq), o and d_out = dL/dO
///   [B, Lq, Hq, Dv], lse the forward's B * Hq * Lq row log-sum-exps ([b][h][row]).
///   dq, dk, dv (shaped like q, k, v) are OVERWRITTEN; with GQA, dk and dv of a key/value head
///   sum over the query heads of its group.
///   bias_grad, laid out like bias.parameters(), is ACCUMULATED (+=): one T5/KERPLE/FIRE table
///   usually serves every layer, so each layer's backward adds its share into one buffer. Zero
///   it before the first layer. Pass it empty for no bias gradient; it must be empty for a
///   policy without learned parameters.
/// lse is checked but not read: P is recomputed exactly as the forward did, which keeps the
/// reference independent of the statistics the fused kernels rely on. Rows that see no key
/// (O = 0, lse = -inf) pass zero gradient to everything.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void reference_attention_backward(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, input_tensor<S> o,
                                  input_tensor<S> d_out, input_span<S> lse, const Bias& bias,
                                  const attention_options<S>& options, output_tensor<S> dq, output_tensor<S> dk,
                                  output_tensor<S> dv, output_span<S> bias_grad = {}) {
  // Preconditions
  //   q, k, v, the bias's head count and options as for reference_attention(); o, d_out, dq, dk,
  //   dv shaped as above; lse of B * Hq * Lq values; bias_grad empty or of parameters().size().
  constexpr const char* where = "relbias::reference_attention_backward";
  detail::check_contiguous_keys(where, options);
  detail::check_qkv(where, q, k, v, index_t(bias.num_heads()), options);
  detail::check_reference_bias_grad<Bias>(where, bias_grad.size());
  std::size_t parameter_count = 0;
  if constexpr (learned_bias<Bias>) parameter_count = std::size_t(bias.parameters().size());
  detail::check_backward(where, q, k, v, o, d_out, lse, dq, dk, dv, bias_grad, parameter_count);
  detail::check_bias_mode(where, bias, options);
  detail::check_no_aliasing(where,
                            {detail::block_of("dq", dq), detail::block_of("dk", dk), detail::block_of("dv", dv),
                             detail::block_of("bias_grad", bias_grad)},
                            {detail::block_of("q", q), detail::block_of("k", k), detail::block_of("v", v), detail::block_of("o", o),
                             detail::block_of("d_out", d_out), detail::block_of("lse", lse), detail::parameter_block(bias)});

  detail::check_sequences(where, q, k, options);

  for (index_t b = 0; b < q.batch; ++b) {  // rows outside every sequence keep these zeros
    for (index_t h = 0; h < q.heads; ++h) dq.matrix(b, h).setZero();
    for (index_t hk = 0; hk < k.heads; ++hk) {  // summed into by every query head of the group
      dk.matrix(b, hk).setZero();
      dv.matrix(b, hk).setZero();
    }
  }
  for (const sequence& seq : detail::make_layout(options, q.batch, q.seq, k.seq).sequences)
    for (index_t h = 0; h < q.heads; ++h)
      detail::reference_head_backward(q, k, v, o, d_out, bias, options, seq, h, dq, dk, dv, bias_grad);
}

}  // namespace relbias
