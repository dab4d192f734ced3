#pragma once
// How the fused backward turns score gradients dS into the gradient of the bias parameters.
// An accumulator lives on one thread; rows of dS stream in through
//   acc.add_row(h, i, j0, n, ds)       ds[c] = dL/dbias(h, i, j0 + c)
// and acc.finish(grad) adds the thread's share into the parameter gradient. Threads finish in a
// fixed order, so the sum is bit-identical from run to run.
//
//   learned shift-invariant policy -> dS summed along each diagonal i - j, O(Lq + Lk) per head,
//                                     then the policy's chain rule once per offset
//   policy.make_gradient_accumulator(w) -> the policy's own (FIRE: grouped by distance below L)
//   any other learned policy        -> the policy's chain rule per cell

#include "relbias/concepts.hpp"
#include "relbias/detail/bias_plan.hpp"

#include <span>
#include <vector>

namespace relbias::detail {

/// For policies without parameters: nothing to accumulate.
template <class Scalar>
struct no_gradient_accumulator {
  void add_row(index_t, index_t, index_t, index_t, const Scalar*) const noexcept {}
  void finish(std::span<Scalar>) const noexcept {}
};

template <offset_differentiable_bias Bias>
class offset_gradient_accumulator {
 public:
  using scalar_type = typename Bias::scalar_type;

  offset_gradient_accumulator(const Bias& bias, const position_window& window)
      : bias_(bias), window_(window), sums_(bias.num_heads(), window) {}

  void add_row(index_t h, index_t i, index_t j0, index_t n, const scalar_type* ds) {
    add_values(ds, n, sums_.row(h, i, j0));  // one contiguous diagonal slice per row
  }

  void finish(std::span<scalar_type> grad) const {
    // The table runs from the largest offset down; the policy wants d_bias from min_offset up.
    aligned_vector<scalar_type> d_bias(std::size_t(sums_.count()));
    for (index_t h = 0; h < index_t(bias_.num_heads()); ++h) {
      const scalar_type* sums = sums_.head(h);
      for (index_t t = 0; t < sums_.count(); ++t) d_bias[std::size_t(sums_.count() - 1 - t)] = sums[t];
      bias_.accumulate_offset_gradient(h, window_.min_offset(), std::span<const scalar_type>(d_bias), grad);
    }
  }

 private:
  const Bias& bias_;
  position_window window_;
  offset_table<scalar_type> sums_;  // (H, offset_count), zero-initialised
};

template <cell_differentiable_bias Bias>
class cell_gradient_accumulator {
 public:
  using scalar_type = typename Bias::scalar_type;

  explicit cell_gradient_accumulator(const Bias& bias)
      : bias_(bias), grad_(param_vector<scalar_type>::Zero(bias.parameters().size())) {}

  void add_row(index_t h, index_t i, index_t j0, index_t n, const scalar_type* ds) {
    const std::span<scalar_type> grad(grad_.data(), std::size_t(grad_.size()));
    for (index_t c = 0; c < n; ++c)
      if (ds[c] != scalar_type(0)) bias_.accumulate_gradient(h, i, j0 + c, ds[c], grad);
  }

  void finish(std::span<scalar_type> grad) const {
    for (std::size_t n = 0; n < grad.size(); ++n) grad[n] += grad_[index_t(n)];
  }

 private:
  const Bias& bias_;
  param_vector<scalar_type> grad_;
};

template <differentiable_bias Bias>
auto make_gradient_accumulator(const Bias& bias, const position_window& window) {
  if constexpr (requires { bias.make_gradient_accumulator(window); }) return bias.make_gradient_accumulator(window);
  else if constexpr (offset_differentiable_bias<Bias>) return offset_gradient_accumulator<Bias>(bias, window);
  else return cell_gradient_accumulator<Bias>(bias);
}

}  // namespace relbias::detail
