#pragma once
#include "relbias/concepts.hpp"

#include <stdexcept>
#include <string>

namespace relbias {

/// No bias: the baseline every scheme is compared against.
///   bias(h, i, j) = 0
/// Learned params: none | Cost: none (kernels skip it) | Valid: H >= 1
/// Example: relbias::no_bias<float> b{8};  b(0, 5, 2) == 0.0f
template <std::floating_point Scalar>
class no_bias {
 public:
  using scalar_type = Scalar;
  static constexpr bool is_learned = false;
  static constexpr bool is_shift_invariant = true;

  explicit no_bias(index_t num_heads) : num_heads_(num_heads) {
    if (num_heads < 1)
      throw std::invalid_argument("relbias::no_bias: num_heads must be >= 1, got " + std::to_string(num_heads));
  }

  index_t num_heads() const noexcept { return num_heads_; }
  Scalar at_offset(index_t, index_t) const noexcept { return Scalar(0); }
  Scalar operator()(index_t, index_t, index_t) const noexcept { return Scalar(0); }

 private:
  index_t num_heads_;
};

static_assert(shift_invariant_bias<no_bias<float>> && shift_invariant_bias<no_bias<double>>);

/// True for the baseline, so kernels can skip adding zeros.
template <class P>
inline constexpr bool is_no_bias_v = false;
template <class Scalar>
inline constexpr bool is_no_bias_v<no_bias<Scalar>> = true;

}  // namespace relbias
