#pragma once
// User-defined policies shared by the kernel tests: no fast paths, so the kernels take their
// generic per-element routes.

#include <relbias/concepts.hpp>

#include <cmath>
#include <span>

namespace relbias_test {

using relbias::index_t;
using relbias::param_vector;

/// Not learned, no fast path: the per-element bias plan.
/// bias(h, i, j) = 0.3 sin(0.1 i + 0.7 (j + h))
template <class S>
struct wave_bias {
  using scalar_type = S;
  index_t heads;
  index_t num_heads() const { return heads; }
  S operator()(index_t h, index_t i, index_t j) const { return S(0.3) * std::sin(S(0.1) * S(i) + S(0.7) * S(j + h)); }
};

/// Learned, with only the per-cell gradient: the generic gradient accumulator.
/// bias(h, i, j) = a_h * sin(0.3 i - 0.5 j)
template <class S>
class learned_wave {
 public:
  using scalar_type = S;
  static constexpr bool is_learned = true;
  explicit learned_wave(index_t heads) : amplitude_(param_vector<S>::LinSpaced(heads, S(0.5), S(1.5))) {}
  index_t num_heads() const { return amplitude_.size(); }
  S operator()(index_t h, index_t i, index_t j) const { return amplitude_[h] * wave(i, j); }
  Eigen::Map<param_vector<S>> parameters() { return {amplitude_.data(), amplitude_.size()}; }
  Eigen::Map<const param_vector<S>> parameters() const { return {amplitude_.data(), amplitude_.size()}; }
  void accumulate_gradient(index_t h, index_t i, index_t j, S d_bias, std::span<S> grad) const {
    grad[std::size_t(h)] += d_bias * wave(i, j);
  }

 private:
  static S wave(index_t i, index_t j) { return std::sin(S(0.3) * S(i) - S(0.5) * S(j)); }
  param_vector<S> amplitude_;
};
static_assert(relbias::cell_differentiable_bias<learned_wave<double>>);

}  // namespace relbias_test
