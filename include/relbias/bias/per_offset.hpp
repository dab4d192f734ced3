#pragma once
// Shared learnable bias per offset: one learned scalar per clipped query-key offset, per head.
// Sources: Xiao & Zhu, "Foundations of Large Language Models", ch. 2 ("Shared Learnable Bias per
//   Offset": PE(i, j) = u_{i-j}, one learnable scalar per offset i - j, no clipping);
//   Shaw, Uszkoreit, Vaswani 2018, "Self-Attention with Relative Position Representations"
//   ("the maximum relative position we consider is clipped to a maximum absolute value of k",
//   clip(x, k) = max(-k, min(k, x)) applied to j - i).
//
// Our definition: delta = i - j (the textbook's sign; Shaw clips j - i, which mirrors the table
// index), clipped to K so the table does not grow with the sequence, and one scalar per head
// (T5-style per-head parameters; Shaw learns vectors added to keys and values, shared by heads).
// Causal tables have no entries for future keys: they share entry 0 with delta = 0 and are masked.
// Offsets go through offset.hpp's clipped_offset_index / clipped_offset_count, as in the kernels.
// Neither source fixes an initialisation: the table starts at zero, reset_parameters draws normal
// values (T5 would use std = d_model^-0.5).

#include "relbias/concepts.hpp"
#include "relbias/config.hpp"
#include "relbias/detail/random.hpp"
#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

/// Shared learnable bias per offset (Xiao & Zhu ch. 2, u_{i-j}; clipping from Shaw et al., 2018).
///   bidirectional: bias(h, i, j) = table[h][clamp(i - j, -K, K) + K]   2K + 1 entries per head
///   causal:        bias(h, i, j) = table[h][clamp(i - j,  0, K)]       K + 1 entries (future -> 0)
/// Learned params: table [H][entries] | Cost: O(1) per (i, j) | Valid: H >= 1, K >= 0
/// Example: relbias::per_offset<float> b{2, relbias::masking::causal, 4};  b(0, 9, 2) == b.table()(0, 4)
template <std::floating_point Scalar>
class per_offset {
 public:
  using scalar_type = Scalar;
  using table_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;

  /// Zero table; reset_parameters() draws normal values. The mode is the one source of the masking:
  /// attention calls whose options.mask differs throw std::invalid_argument.
  per_offset(index_t num_heads, masking mode, index_t clip) : num_heads_(num_heads), clip_(clip), mode_(mode) {
    if (num_heads < 1)
      throw std::invalid_argument("relbias::per_offset: num_heads must be >= 1, got num_heads=" + std::to_string(num_heads));
    // 2K + 1 entries per head must fit in an index for every head.
    if (clip < 0 || clip > (detail::max_elements<Scalar>() / num_heads - 1) / 2)
      throw std::invalid_argument("relbias::per_offset: clip must be >= 0 and (2 * clip + 1) * num_heads must fit in one "
                                  "allocation, got clip=" + std::to_string(clip) + ", num_heads=" + std::to_string(num_heads));
    table_ = param_vector<Scalar>::Zero(num_heads * entries());
  }

  /// Throws std::invalid_argument naming the first table entry that is not finite. Call it after
  /// writing through parameters() or table() (load_parameters does).
  void validate() const {
    for (index_t n = 0; n < table_.size(); ++n)
      if (!std::isfinite(table_[n]))
        throw std::invalid_argument("relbias::per_offset: table entry (head " + std::to_string(n / entries()) + ", index " +
                                    std::to_string(n % entries()) + ") must be finite, got " + std::to_string(double(table_[n])));
  }

  index_t num_heads() const noexcept { return num_heads_; }
  /// What a parameter file records of the policy (train.hpp): "per_offset(heads 4, clip 8, causal)".
  std::string configuration() const {
    return "per_offset(heads " + std::to_string(num_heads_) + ", clip " + std::to_string(clip_) + ", " + masking_name(mode_) + ")";
  }
  index_t clip() const noexcept { return clip_; }
  masking mode() const noexcept { return mode_; }
  /// Entries per head: 2K + 1 (bidirectional) or K + 1 (causal).
  index_t entries() const noexcept { return clipped_offset_count(mode_, clip_); }

  Scalar at_offset(index_t h, index_t delta) const noexcept {
    RELBIAS_ASSERT(h >= 0 && h < num_heads_);
    return table_[h * entries() + clipped_offset_index(mode_, delta, clip_)];
  }
  Scalar operator()(index_t h, index_t i, index_t j) const noexcept { return at_offset(h, relative_offset(i, j)); }

  /// Every parameter, element (h, index) at h * entries() + index.
  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {table_.data(), table_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {table_.data(), table_.size()}; }
  /// The same storage as an (H, entries) row-major matrix.
  Eigen::Map<table_matrix> table() noexcept { return {table_.data(), num_heads_, entries()}; }
  Eigen::Map<const table_matrix> table() const noexcept { return {table_.data(), num_heads_, entries()}; }

  /// normal(0, std) in parameters() order from detail::random_stream (same numbers on every
  /// standard library).
  void reset_parameters(std::uint64_t seed, double std) {
    if (!(std >= 0) || !std::isfinite(std))
      throw std::invalid_argument("relbias::per_offset::reset_parameters: std must be finite and >= 0, got std=" +
                                  std::to_string(std));
    detail::random_stream rng(seed);
    for (Scalar& value : table_) value = Scalar(rng.normal(0.0, std));
  }

  /// d_bias[k] = dL/dbias summed over the cells with i - j == delta_lo + k (head h). Clipped
  /// offsets share an entry, so their sums add up: grad[h][index(delta)] += d_bias[k].
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const {
    RELBIAS_ASSERT(index_t(grad.size()) == table_.size() && h >= 0 && h < num_heads_);
    const index_t row = h * entries();
    for (std::size_t k = 0; k < d_bias.size(); ++k)
      grad[std::size_t(row + clipped_offset_index(mode_, delta_lo + index_t(k), clip_))] += d_bias[k];
  }

 private:
  index_t num_heads_, clip_;
  masking mode_;
  param_vector<Scalar> table_;  // [H][entries]
};

static_assert(shift_invariant_bias<per_offset<float>> && shift_invariant_bias<per_offset<double>>);
static_assert(learned_bias<per_offset<float>> && learned_bias<per_offset<double>>);
static_assert(offset_differentiable_bias<per_offset<float>> && offset_differentiable_bias<per_offset<double>>);

}  // namespace relbias
