#pragma once
// Shared learnable bias per offset: one scalar per clipped query-key offset, per head.
// Sources: Xiao & Zhu, "Foundations of Large Language Models", ch. 2 ("Shared Learnable Bias per
//   Offset": PE(i, j) = u_{i-j}); Shaw, Uszkoreit, Vaswani 2018 ("clipped to a maximum absolute
//   value of k", clip(x, k) = max(-k, min(k, x))).
// Our definition: delta = i - j (the textbook's sign; Shaw clips j - i, the mirror), clipped to K,
// a scalar per head (T5-style per-head parameters; Shaw learns vectors shared across heads).

#include "relbias/concepts.hpp"
#include "relbias/detail/random.hpp"
#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

/// Shared learnable bias per offset (Shaw et al., 2018 clipping; textbook u_{i-j}).
///   bias(h, i, j) = table[h][clamp(i - j, -K, K) + K]   bidirectional, 2K + 1 entries per head
///   bias(h, i, j) = table[h][clamp(i - j, 0, K)]        causal, K + 1 entries (future keys -> 0)
/// Learned params: table [H][entries] | Cost: O(1) per (i, j) | Valid: H >= 1, K >= 0
/// Example: relbias::per_offset<float> b{2, relbias::masking::causal, 4};  b(0, 9, 2) == b.table()(0, 4)
template <std::floating_point Scalar>
class per_offset {
 public:
  using scalar_type = Scalar;
  using table_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;

  /// Zero table; reset_parameters() draws normal values.
  per_offset(index_t num_heads, masking mode, index_t clip) : num_heads_(num_heads), clip_(clip), mode_(mode) {
    if (num_heads < 1)
      throw std::invalid_argument("relbias::per_offset: num_heads must be >= 1, got " + std::to_string(num_heads));
    if (clip < 0) throw std::invalid_argument("relbias::per_offset: clip must be >= 0, got " + std::to_string(clip));
    table_ = param_vector<Scalar>::Zero(num_heads * entries());
  }

  index_t num_heads() const noexcept { return num_heads_; }
  index_t clip() const noexcept { return clip_; }
  masking mode() const noexcept { return mode_; }
  index_t entries() const noexcept { return clipped_offset_count(mode_, clip_); }

  Scalar at_offset(index_t h, index_t delta) const {
    return table_[h * entries() + clipped_offset_index(mode_, delta, clip_)];
  }
  Scalar operator()(index_t h, index_t i, index_t j) const { return at_offset(h, relative_offset(i, j)); }

  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {table_.data(), table_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {table_.data(), table_.size()}; }
  /// The table as (H, entries), over the same storage.
  Eigen::Map<table_matrix> table() noexcept { return {table_.data(), num_heads_, entries()}; }
  Eigen::Map<const table_matrix> table() const noexcept { return {table_.data(), num_heads_, entries()}; }

  /// normal(0, std); neither source fixes an init (T5 uses std = d_model^-0.5).
  void reset_parameters(std::uint64_t seed, double std) {
    if (!(std >= 0))
      throw std::invalid_argument("relbias::per_offset::reset_parameters: std must be >= 0, got " + std::to_string(std));
    detail::random_stream rng(seed);
    for (Scalar& value : table_) value = Scalar(rng.normal(0.0, std));
  }

  /// grad[h][index(delta)] += d_bias(delta): clipped offsets share their entry.
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const {
    for (std::size_t k = 0; k < d_bias.size(); ++k)
      grad[std::size_t(h * entries() + clipped_offset_index(mode_, delta_lo + index_t(k), clip_))] += d_bias[k];
  }

 private:
  index_t num_heads_, clip_;
  masking mode_;
  param_vector<Scalar> table_;  // [H][entries]
};

static_assert(offset_differentiable_bias<per_offset<float>> && offset_differentiable_bias<per_offset<double>>);

}  // namespace relbias
