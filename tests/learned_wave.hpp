#pragma once
// A user's learned policy for kernel tests: depends on both absolute positions (not
// shift-invariant) and has only the per-cell gradient, so it exercises the generic accumulator.
//   bias(h, i, j) = a_h * sin(0.3 i - 0.5 j)

#include <relbias/concepts.hpp>
#include <relbias/offset.hpp>

#include <cmath>
#include <span>

namespace relbias_test {

template <class S>
class learned_wave {
 public:
  using scalar_type = S;
  static constexpr bool is_learned = true;
  explicit learned_wave(relbias::index_t heads) : amplitude_(relbias::param_vector<S>::LinSpaced(heads, S(0.5), S(1.5))) {}
  relbias::index_t num_heads() const { return amplitude_.size(); }
  S operator()(relbias::index_t h, relbias::index_t i, relbias::index_t j) const { return amplitude_[h] * wave(i, j); }
  Eigen::Map<relbias::param_vector<S>> parameters() { return {amplitude_.data(), amplitude_.size()}; }
  Eigen::Map<const relbias::param_vector<S>> parameters() const { return {amplitude_.data(), amplitude_.size()}; }
  void accumulate_gradient(relbias::index_t h, relbias::index_t i, relbias::index_t j, S d_bias, std::span<S> grad) const {
    grad[std::size_t(h)] += d_bias * wave(i, j);
  }

 private:
  static S wave(relbias::index_t i, relbias::index_t j) { return std::sin(S(0.3) * S(i) - S(0.5) * S(j)); }
  relbias::param_vector<S> amplitude_;
};
static_assert(relbias::cell_differentiable_bias<learned_wave<double>>);

}  // namespace relbias_test
