#pragma once
// T5 bucketed relative position bias.
// Sources: HF transformers src/transformers/models/t5/modeling_t5.py
//   (T5Attention._relative_position_bucket, compute_bias, T5PreTrainedModel._init_weights), itself
//   "adapted from Mesh Tensorflow transformer_layers.py"; Raffel et al. 2020 (JMLR), section 2.1.
//
// Sign: HF passes relative_position = key - query (memory_position - context_position). The
// library's delta = i - j is its negation; t5::bucket(delta) converts.
//
// Arithmetic: HF computes the log branch in float32 (n.float() / max_exact, torch.log, divided by
// the double math.log(max_distance / max_exact) cast to float32, times the int span, truncated by
// .to(torch.long)). We repeat those float32 steps with a correctly rounded logf; that reproduces
// the configurations where float32 and float64 disagree (e.g. 18 buckets / 128 bidirectional at
// |rp| = 8, 16, 64). The log branch is never evaluated below max_exact (HF discards log(0) = -inf
// through torch.where; in C++ converting -inf to an integer is undefined).
//
// Subtleties: max_distance is not where the last bucket starts (32 / 128 bidirectional: bucket
// 15 / 31 from |rp| = 91; causal: bucket 31 from 113); causal mode maps every future key to
// bucket 0, the bucket of distance 0 (those keys are masked). T5 has no 1/sqrt(d): use scale = 1.

#include "relbias/concepts.hpp"
#include "relbias/detail/random.hpp"
#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

namespace detail {

inline void check_t5_config(const char* where, bool bidirectional, index_t num_buckets, index_t max_distance) {
  const index_t per_side = bidirectional ? num_buckets / 2 : num_buckets;
  const index_t max_exact = per_side / 2;
  if (max_exact < 1)
    throw std::invalid_argument(std::string(where) + ": num_buckets must be >= " + (bidirectional ? "4" : "2") +
                                " for " + (bidirectional ? "bidirectional" : "causal") + " buckets, got " +
                                std::to_string(num_buckets));
  if (max_distance <= max_exact)
    throw std::invalid_argument(std::string(where) + ": max_distance must exceed max_exact = " +
                                std::to_string(max_exact) + " (num_buckets=" + std::to_string(num_buckets) +
                                "), got max_distance=" + std::to_string(max_distance));
}

/// The log-spaced part of a bucket: max_exact + trunc(log(n / me) / log(md / me) * (nb - me)),
/// capped at nb - 1, in HF's float32 steps. Needs n >= max_exact.
inline index_t t5_log_bucket(index_t n, index_t per_side, index_t max_distance) {
  const index_t max_exact = per_side / 2;
  const float ratio = float(n) / float(max_exact);
  const float log_ratio = float(std::log(double(ratio)));  // correctly rounded logf
  const float log_span = float(std::log(double(max_distance) / double(max_exact)));
  const float offset = log_ratio / log_span * float(per_side - max_exact);
  const index_t last = per_side - 1;
  // Compare in float first: truncating a float beyond the integer range is undefined.
  return offset >= float(last - max_exact) ? last : std::min(last, max_exact + index_t(offset));
}

}  // namespace detail

/// HF transformers' T5Attention._relative_position_bucket, bit for bit, with HF's sign
/// (relative_position = key position - query position). Throws std::invalid_argument when
/// num_buckets leaves no exact bucket or max_distance <= max_exact.
inline index_t t5_relative_position_bucket(index_t relative_position, bool bidirectional, index_t num_buckets = 32,
                                           index_t max_distance = 128) {
  detail::check_t5_config("relbias::t5_relative_position_bucket", bidirectional, num_buckets, max_distance);
  index_t bucket = 0, n = 0;
  index_t per_side = num_buckets;
  if (bidirectional) {
    per_side = num_buckets / 2;
    bucket = relative_position > 0 ? per_side : 0;
    n = relative_position < 0 ? -relative_position : relative_position;
  } else {
    n = relative_position < 0 ? -relative_position : 0;  // future keys -> n = 0
  }
  if (n < per_side / 2) return bucket + n;
  return bucket + detail::t5_log_bucket(n, per_side, max_distance);
}

/// T5 bucketed bias (Raffel et al., 2020; HF transformers T5Attention).
///   bias(h, i, j) = table[bucket(j - i)][h],  bucket = HF _relative_position_bucket
/// Learned params: table [num_buckets][H] (HF's nn.Embedding(num_buckets, n_heads).weight)
/// Cost: O(1) per (i, j) | Valid: bidirectional num_buckets >= 4, causal >= 2, max_distance > max_exact
/// Example: relbias::t5<float> b{8, relbias::masking::bidirectional};  b.bucket(-16) == 26
template <std::floating_point Scalar>
class t5 {
 public:
  using scalar_type = Scalar;
  using table_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;

  /// Zero table; reset_parameters() draws HF's initialisation.
  t5(index_t num_heads, masking mode, index_t num_buckets = 32, index_t max_distance = 128)
      : num_heads_(num_heads), num_buckets_(num_buckets), max_distance_(max_distance), mode_(mode) {
    if (num_heads < 1) throw std::invalid_argument("relbias::t5: num_heads must be >= 1, got " + std::to_string(num_heads));
    detail::check_t5_config("relbias::t5", mode == masking::bidirectional, num_buckets, max_distance);
    table_ = param_vector<Scalar>::Zero(num_buckets * num_heads);
  }

  index_t num_heads() const noexcept { return num_heads_; }
  index_t num_buckets() const noexcept { return num_buckets_; }
  index_t max_distance() const noexcept { return max_distance_; }
  masking mode() const noexcept { return mode_; }

  /// Bucket of the library's delta = i - j (HF's relative_position is -delta).
  index_t bucket(index_t delta) const {
    return t5_relative_position_bucket(-delta, mode_ == masking::bidirectional, num_buckets_, max_distance_);
  }

  Scalar at_offset(index_t h, index_t delta) const { return table_[bucket(delta) * num_heads_ + h]; }
  Scalar operator()(index_t h, index_t i, index_t j) const { return at_offset(h, relative_offset(i, j)); }

  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {table_.data(), table_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {table_.data(), table_.size()}; }
  /// The table as (num_buckets, H), over the same storage.
  Eigen::Map<table_matrix> table() noexcept { return {table_.data(), num_buckets_, num_heads_}; }
  Eigen::Map<const table_matrix> table() const noexcept { return {table_.data(), num_buckets_, num_heads_}; }

  /// HF's init: normal(0, factor * d_model^-0.5).
  void reset_parameters(std::uint64_t seed, double d_model, double factor = 1.0) {
    if (!(d_model > 0))
      throw std::invalid_argument("relbias::t5::reset_parameters: d_model must be > 0, got " + std::to_string(d_model));
    detail::random_stream rng(seed);
    for (Scalar& value : table_) value = Scalar(rng.normal(0.0, factor / std::sqrt(d_model)));
  }

  /// Scatter-add by bucket: grad[bucket(delta)][h] += d_bias(delta).
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const {
    for (std::size_t k = 0; k < d_bias.size(); ++k)
      grad[std::size_t(bucket(delta_lo + index_t(k)) * num_heads_ + h)] += d_bias[k];
  }

 private:
  index_t num_heads_, num_buckets_, max_distance_;
  masking mode_;
  param_vector<Scalar> table_;  // [num_buckets][H]
};

static_assert(offset_differentiable_bias<t5<float>> && offset_differentiable_bias<t5<double>>);

}  // namespace relbias
