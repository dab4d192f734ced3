#pragma once
// The bias-policy concepts. A policy answers p(h, i, j): the bias of head h for the query at
// absolute position i and the key at absolute position j (positions, not offsets: FIRE
// normalises by the query position, so not every policy is a function of i - j).
//
// Everything beyond the core concept is optional and detected at compile time:
//   is_learned / is_shift_invariant     static constexpr bool members (default false)
//   at_offset(h, delta)                 shift-invariant policies: the bias as a function of i - j;
//                                       kernels tabulate it once per call (O(Lq + Lk) per head)
//   parameters()                        learned policies: every parameter in one flat Eigen map,
//                                       the layout that gradients, optimisers and files share
//   accumulate_offset_gradient(...)     learned shift-invariant policies: chain rule from the
//                                       bias gradient summed along each diagonal i - j
//   accumulate_gradient(h, i, j, g, .)  any learned policy: chain rule for one cell

#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <concepts>
#include <cstddef>
#include <limits>
#include <span>

namespace relbias {

namespace detail {

/// Elements of T that one allocation can hold: the bound every size product is checked against.
template <class T>
constexpr index_t max_elements() noexcept {
  return index_t(std::numeric_limits<std::ptrdiff_t>::max() / index_t(sizeof(T)));
}

}  // namespace detail

/// Flat parameter and gradient storage of learned policies.
template <class Scalar>
using param_vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

template <class P>
concept bias_policy = std::floating_point<typename P::scalar_type> &&
  requires(const P& p, index_t h, index_t i, index_t j) {
    { p.num_heads() } -> std::convertible_to<index_t>;
    { p(h, i, j) } -> std::same_as<typename P::scalar_type>;  // bias for query pos i, key pos j
  };

/// P::is_learned if the policy declares it, else false.
template <class P>
inline constexpr bool is_learned_v = [] {
  if constexpr (requires { P::is_learned; }) return bool(P::is_learned);
  else return false;
}();

/// P::is_shift_invariant if the policy declares it, else false.
template <class P>
inline constexpr bool is_shift_invariant_v = [] {
  if constexpr (requires { P::is_shift_invariant; }) return bool(P::is_shift_invariant);
  else return false;
}();

/// A policy whose bias depends only on delta = i - j: p(h, i, j) == p.at_offset(h, i - j).
template <class P>
concept shift_invariant_bias = bias_policy<P> && is_shift_invariant_v<P> &&
  requires(const P& p, index_t h, index_t delta) {
    { p.at_offset(h, delta) } -> std::same_as<typename P::scalar_type>;
  };

/// A policy with trainable parameters, all stored in one contiguous vector.
template <class P>
concept learned_bias = bias_policy<P> && is_learned_v<P> &&
  requires(P& p, const P& cp) {
    { p.parameters() } -> std::same_as<Eigen::Map<param_vector<typename P::scalar_type>>>;
    { cp.parameters() } -> std::same_as<Eigen::Map<const param_vector<typename P::scalar_type>>>;
  };

/// Learned and shift-invariant: the gradient needs only the bias gradient summed along each
/// diagonal. d_bias[k] = sum over cells with i - j == delta_lo + k of dL/db(h, i, j); the
/// policy adds dL/dtheta into grad (laid out like parameters()).
template <class P>
concept offset_differentiable_bias = learned_bias<P> && shift_invariant_bias<P> &&
  requires(const P& p, index_t h, index_t delta_lo, std::span<const typename P::scalar_type> d_bias,
           std::span<typename P::scalar_type> grad) {
    p.accumulate_offset_gradient(h, delta_lo, d_bias, grad);
  };

/// Learned, with the chain rule for one cell: grad += d_bias * db(h, i, j)/dtheta.
template <class P>
concept cell_differentiable_bias = learned_bias<P> &&
  requires(const P& p, index_t h, index_t i, index_t j, typename P::scalar_type d_bias,
           std::span<typename P::scalar_type> grad) {
    p.accumulate_gradient(h, i, j, d_bias, grad);
  };

template <class P>
concept differentiable_bias = offset_differentiable_bias<P> || cell_differentiable_bias<P>;

}  // namespace relbias
