#pragma once
// ALiBi slopes and bias.
// Sources: Press, Smith, Lewis, "Train Short, Test Long" (ICLR 2022);
//   ofirpress/attention_with_linear_biases fairseq/models/transformer.py (get_slopes);
//   bidirectional form -m|i - j|: the authors' issue #5, FlashAttention's alibi_slopes docstring;
//   max_bias: ggml soft_max / flash_attn_ext (m0 = 2^(-max_bias/n_log2), m1 = 2^(-max_bias/2/n_log2)).

#include "relbias/concepts.hpp"

#include <cmath>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace relbias {

namespace detail {

/// get_slopes builds the slopes of the next power of two: 2H doubles must fit in one allocation.
inline constexpr index_t alibi_max_heads = max_elements<double>() / 2;

inline void check_alibi_heads(const char* where, index_t num_heads) {
  if (num_heads < 1 || num_heads > alibi_max_heads)
    throw std::invalid_argument(std::string(where) + ": num_heads must be in [1, " + std::to_string(alibi_max_heads) + "], got " +
                                std::to_string(num_heads));
}

// get_slopes_power_of_2(n): start = 2**(-2**-(log2(n)-3)); [start * start**h for h in range(n)].
// Evaluated in double with the same operations as the Python, so the double result is
// bit-identical to the authors' list.
inline std::vector<double> alibi_slopes_power_of_2(index_t n) {
  const double start = std::pow(2.0, -std::pow(2.0, -(std::log2(double(n)) - 3.0)));
  std::vector<double> slopes(static_cast<std::size_t>(n));
  for (index_t h = 0; h < n; ++h) slopes[std::size_t(h)] = start * std::pow(start, double(h));
  return slopes;
}

// get_slopes(n): powers of two directly; otherwise the slopes of the closest lower power of two
// p, then every other slope of get_slopes(2p) (interleaving) for the remaining n - p heads.
inline std::vector<double> alibi_slopes_authors(index_t n) {
  index_t p = 1;
  while (p * 2 <= n) p *= 2;
  std::vector<double> slopes = alibi_slopes_power_of_2(p);
  if (p == n) return slopes;
  const std::vector<double> extra = alibi_slopes_authors(2 * p);
  for (index_t k = 0; k < n - p; ++k) slopes.push_back(extra[std::size_t(2 * k)]);
  return slopes;
}

// ggml's generalisation: the "8" of the paper becomes max_bias; max_bias <= 0 gives slope 1.
inline std::vector<double> alibi_slopes_ggml(index_t n, double max_bias) {
  std::vector<double> slopes(static_cast<std::size_t>(n), 1.0);
  if (max_bias <= 0.0) return slopes;
  index_t n_log2 = 1;
  while (n_log2 * 2 <= n) n_log2 *= 2;
  const double m0 = std::pow(2.0, -max_bias / double(n_log2));
  const double m1 = std::pow(2.0, -(max_bias / 2.0) / double(n_log2));
  for (index_t h = 0; h < n; ++h)
    slopes[std::size_t(h)] = h < n_log2 ? std::pow(m0, double(h + 1)) : std::pow(m1, double(2 * (h - n_log2) + 1));
  return slopes;
}

}  // namespace detail

/// The ALiBi slopes m_0 .. m_{H-1}, exactly as the authors' get_slopes(num_heads), for any head
/// count (non-powers of two interleave: H = 3 gives 1/16, 1/256, 1/4). Computed in double and
/// rounded once to T.
template <std::floating_point T>
std::vector<T> alibi_slopes(index_t num_heads) {
  detail::check_alibi_heads("relbias::alibi_slopes", num_heads);
  const std::vector<double> slopes = detail::alibi_slopes_authors(num_heads);
  return std::vector<T>(slopes.begin(), slopes.end());
}

/// ALiBi: linear distance penalty (Press et al., 2022, "Train Short, Test Long").
///   bias(h, i, j) = -m_h * |i - j|   (= -m_h (i - j) on the visible keys of causal attention)
///   m_h from the authors' get_slopes(H), or ggml's formula with a max_bias other than 8
/// Learned params: none, or the H slopes with Trainable = true (dm_h = sum -|i - j| dS)
/// Cost: O(1) per (i, j) | Valid: H >= 1 (non-powers of two interleave), max_bias finite, or
///   explicit finite slopes: relbias::alibi<float> b{std::vector<float>{0.5f, 0.25f}}
/// Example: relbias::alibi<float> b{8};  b(0, 5, 2) == -1.5f
template <std::floating_point Scalar, bool Trainable = false>
class alibi {
 public:
  using scalar_type = Scalar;
  static constexpr bool is_learned = Trainable;
  static constexpr bool is_shift_invariant = true;

  /// max_bias = 8 reproduces the paper; other values follow ggml (max_bias <= 0: every slope 1).
  explicit alibi(index_t num_heads, double max_bias = 8.0) {
    detail::check_alibi_heads("relbias::alibi", num_heads);
    if (!std::isfinite(max_bias))
      throw std::invalid_argument("relbias::alibi: max_bias must be finite, got " + std::to_string(max_bias));
    const std::vector<double> m = max_bias == 8.0 ? detail::alibi_slopes_authors(num_heads)
                                                  : detail::alibi_slopes_ggml(num_heads, max_bias);
    slopes_.resize(num_heads);
    for (index_t h = 0; h < num_heads; ++h) slopes_[h] = Scalar(m[std::size_t(h)]);
  }

  /// Explicit slopes m_0 .. m_{H-1} (a checkpoint's, or another library's): one per head, finite.
  /// Throws std::invalid_argument for none, null data or a non-finite slope.
  explicit alibi(std::span<const Scalar> slopes) {
    if (slopes.empty() || slopes.data() == nullptr)
      throw std::invalid_argument("relbias::alibi: slopes need one value per head (non-empty, with data), got " +
                                  std::to_string(slopes.size()) + " values");
    detail::check_alibi_heads("relbias::alibi", index_t(slopes.size()));
    slopes_.resize(index_t(slopes.size()));
    for (index_t h = 0; h < slopes_.size(); ++h) slopes_[h] = slopes[std::size_t(h)];  // a plain loop, as in sgd::step
    validate();
  }

  /// Throws std::invalid_argument naming the first slope that is not finite. Call it after writing
  /// through parameters() (load_parameters does); the constructors call it.
  void validate() const {
    for (index_t h = 0; h < slopes_.size(); ++h)
      if (!std::isfinite(slopes_[h]))
        throw std::invalid_argument("relbias::alibi: slope of head " + std::to_string(h) + " must be finite, got " +
                                    std::to_string(double(slopes_[h])));
  }

  index_t num_heads() const noexcept { return slopes_.size(); }
  /// What a parameter file records of the policy (train.hpp): "alibi(heads 8, trainable)".
  std::string configuration() const {
    return "alibi(heads " + std::to_string(num_heads()) + (Trainable ? ", trainable)" : ")");
  }
  Scalar slope(index_t h) const { return slopes_[h]; }

  Scalar at_offset(index_t h, index_t delta) const { return -slopes_[h] * Scalar(delta < 0 ? -delta : delta); }
  Scalar operator()(index_t h, index_t i, index_t j) const { return at_offset(h, relative_offset(i, j)); }

  /// The slopes, when they are trainable.
  Eigen::Map<param_vector<Scalar>> parameters() requires Trainable { return {slopes_.data(), slopes_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const requires Trainable {
    return {slopes_.data(), slopes_.size()};
  }

  /// dL/dm_h = sum over delta of -|delta| * dL/db(delta).
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const requires Trainable {
    Scalar sum = 0;
    for (std::size_t k = 0; k < d_bias.size(); ++k) {
      const index_t delta = delta_lo + index_t(k);
      sum -= Scalar(delta < 0 ? -delta : delta) * d_bias[k];
    }
    grad[std::size_t(h)] += sum;
  }

 private:
  param_vector<Scalar> slopes_;  // (H)
};

static_assert(shift_invariant_bias<alibi<float>> && shift_invariant_bias<alibi<double>>);
static_assert(!learned_bias<alibi<float>> && offset_differentiable_bias<alibi<double, true>>);

}  // namespace relbias
