#pragma once
// T5 bucketed relative position bias.
// Sources: HF transformers src/transformers/models/t5/modeling_t5.py
//   (T5Attention._relative_position_bucket, T5Attention.compute_bias, T5Attention.forward,
//   T5PreTrainedModel._init_weights, T5Stack), whose docstring says "Adapted from Mesh Tensorflow
//   ... transformer_layers.py#L593"; Raffel et al. 2020, "Exploring the Limits of Transfer Learning
//   with a Unified Text-to-Text Transformer" (JMLR), section 2.1.
//
// Sign: HF passes relative_position = memory_position - context_position = j - i (key minus
// query). The library's delta = i - j is its negation; t5::bucket(delta) converts, the free
// function t5_relative_position_bucket keeps HF's sign.
//
// Arithmetic: HF computes the log branch in float32: relative_position.float() / max_exact,
// torch.log, divided by the Python double math.log(max_distance / max_exact) (PyTorch casts it to
// float32), times the int span, truncated by .to(torch.long). We repeat those float32 steps with a
// correctly rounded logf, so configurations where float32 and float64 disagree (18 buckets / 128
// bidirectional at |rp| = 8, 16, 64) get HF's float32 bucket. The log branch is never evaluated
// below max_exact: HF computes log(0) = -inf there and discards it through torch.where, and in C++
// converting -inf (or any float outside the integer range) to an integer is undefined.
//
// Subtleties:
// * max_distance is not where the last bucket starts: 32 / 128 bidirectional reaches bucket
//   15 / 31 at |rp| = 91, causal reaches bucket 31 at 113.
// * Causal mode maps every future key (rp > 0) to bucket 0, the bucket of distance 0; those keys
//   are masked anyway.
// * T5 has no 1/sqrt(d) (HF's scaling is 1.0; Mesh TF folds it into the q initialisation): run T5
//   checkpoints with scale = 1. The bias is added to the unscaled scores, as everywhere in relbias.
// * HF shares one table per stack (only block 0 has has_relative_attention_bias): use one policy
//   object for every layer and accumulate its gradient over all of them.

#include "relbias/concepts.hpp"
#include "relbias/config.hpp"
#include "relbias/detail/random.hpp"
#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

namespace detail {

inline constexpr index_t t5_index_max = std::numeric_limits<index_t>::max();

/// -x, saturating: the one value without a positive counterpart maps to the largest index.
/// Distances that large are in the last bucket under every configuration that gets there at all.
constexpr index_t t5_negate(index_t x) noexcept { return x == std::numeric_limits<index_t>::min() ? t5_index_max : -x; }

/// HF's _relative_position_bucket for one configuration, validated once. The policy keeps one;
/// the free function builds one per call.
class t5_bucketing {
 public:
  t5_bucketing(const char* where, bool bidirectional, index_t num_buckets, index_t max_distance)
      : bidirectional_(bidirectional),
        per_side_(bidirectional ? num_buckets / 2 : num_buckets),
        max_exact_(per_side_ / 2) {
    const std::string config = " (num_buckets=" + std::to_string(num_buckets) + ", max_distance=" +
                               std::to_string(max_distance) + (bidirectional ? ", bidirectional)" : ", causal)");
    if (max_exact_ < 1)
      throw std::invalid_argument(std::string(where) + ": num_buckets must be >= " + (bidirectional ? "4" : "2") +
                                  " so that max_exact >= 1, got num_buckets=" + std::to_string(num_buckets) + config);
    if (max_distance <= max_exact_)
      throw std::invalid_argument(std::string(where) + ": max_distance must exceed max_exact = " +
                                  std::to_string(max_exact_) + " (else log(max_distance / max_exact) <= 0), got max_distance=" +
                                  std::to_string(max_distance) + config);
    log_span_ = float(std::log(double(max_distance) / double(max_exact_)));  // Python double -> float32
    // Only reachable for max_exact beyond 2^52, where the double ratio rounds to 1.
    if (!(log_span_ > 0.0f))
      throw std::invalid_argument(std::string(where) + ": log(max_distance / max_exact) rounds to 0 for max_distance=" +
                                  std::to_string(max_distance) + ", max_exact=" + std::to_string(max_exact_) + config);
    span_ = float(per_side_ - max_exact_);
  }

  /// Bucket of HF's relative_position (= key - query).
  index_t operator()(index_t relative_position) const noexcept {
    const index_t side = bidirectional_ && relative_position > 0 ? per_side_ : 0;
    const index_t n = bidirectional_ ? (relative_position > 0 ? relative_position : t5_negate(relative_position))
                                     : (relative_position < 0 ? t5_negate(relative_position) : 0);
    return side + (n < max_exact_ ? n : log_bucket(n));
  }

  /// Bucket of distance n >= max_exact on one side: max_exact + trunc(log(n / me) / log(md / me)
  /// * (per_side - me)), capped at per_side - 1, in HF's float32 steps.
  index_t log_bucket(index_t n) const noexcept {
    RELBIAS_ASSERT(n >= max_exact_);
    const float ratio = float(n) / float(max_exact_);
    const float log_ratio = float(std::log(double(ratio)));  // correctly rounded logf (glibc's logf need not be)
    const float scaled = log_ratio / log_span_ * span_;
    // Compare in float before converting: converting inf, or anything from 2^63 on, to an integer
    // is undefined. Such values are past every bucket, so HF's min(..., num_buckets - 1) gives last().
    if (!(scaled < 0x1p63f)) return last();
    return max_exact_ + std::min(last() - max_exact_, index_t(scaled));
  }

  /// The last bucket of one side (the past side in both modes).
  index_t last() const noexcept { return per_side_ - 1; }
  index_t per_side() const noexcept { return per_side_; }
  bool bidirectional() const noexcept { return bidirectional_; }

  /// The first distance whose bucket is last(), or 0 when float32 rounding never gets there.
  /// log_bucket is non-decreasing in n (each float32 step is monotone), so bisection finds it.
  index_t saturation() const noexcept {
    if (log_bucket(t5_index_max) < last()) return 0;
    index_t lo = max_exact_, hi = t5_index_max;  // invariant: log_bucket(hi) == last()
    while (lo < hi) {
      const index_t mid = lo + (hi - lo) / 2;
      if (log_bucket(mid) < last()) lo = mid + 1;
      else hi = mid;
    }
    return hi;
  }

 private:
  bool bidirectional_;
  index_t per_side_, max_exact_;
  float log_span_ = 0, span_ = 0;
};

}  // namespace detail

/// HF transformers' T5Attention._relative_position_bucket, bit for bit (float32 steps, correctly
/// rounded logf), with HF's sign: relative_position = key position - query position.
/// Bidirectional: buckets [0, num_buckets / 2) for keys at or before the query, the upper half for
/// keys after it. Causal: keys after the query share bucket 0.
/// Throws std::invalid_argument when num_buckets leaves no exact bucket (bidirectional < 4,
/// causal < 2) or max_distance <= max_exact.
/// Example: relbias::t5_relative_position_bucket(16, true) == 26 (key 16 after the query)
inline index_t t5_relative_position_bucket(index_t relative_position, bool bidirectional, index_t num_buckets = 32,
                                           index_t max_distance = 128) {
  return detail::t5_bucketing("relbias::t5_relative_position_bucket", bidirectional, num_buckets,
                              max_distance)(relative_position);
}

/// T5 bucketed bias (Raffel et al., 2020; HF transformers T5Attention).
///   bias(h, i, j) = table[bucket(j - i)][h],  bucket = HF's _relative_position_bucket (float32)
///   bidirectional = (mode == masking::bidirectional); causal: future keys -> bucket 0
/// Learned params: table [num_buckets][H] (HF's nn.Embedding(num_buckets, n_heads).weight)
/// Cost: O(1) per (i, j), one log below the last bucket | Valid: H >= 1, bidirectional
///   num_buckets >= 4, causal >= 2, max_distance > max_exact | No 1/sqrt(d) in T5: scale = 1
/// Example: relbias::t5<float> b{8, relbias::masking::bidirectional};  b.bucket(-16) == 26
template <std::floating_point Scalar>
class t5 {
 public:
  using scalar_type = Scalar;
  using table_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;

  /// Zero table; reset_parameters() draws HF's initialisation. The mode is the one source of the
  /// masking: attention calls whose options.mask differs throw std::invalid_argument.
  t5(index_t num_heads, masking mode, index_t num_buckets = 32, index_t max_distance = 128)
      : num_heads_(num_heads), num_buckets_(num_buckets), max_distance_(max_distance), mode_(mode),
        bucketing_("relbias::t5", mode == masking::bidirectional, num_buckets, max_distance) {
    if (num_heads < 1) throw std::invalid_argument("relbias::t5: num_heads must be >= 1, got " + std::to_string(num_heads));
    if (num_buckets > detail::max_elements<Scalar>() / num_heads)
      throw std::invalid_argument("relbias::t5: num_buckets * num_heads overflows one allocation, got num_buckets=" +
                                  std::to_string(num_buckets) + ", num_heads=" + std::to_string(num_heads));
    table_ = param_vector<Scalar>::Zero(num_buckets * num_heads);
    saturation_ = bucketing_.saturation();
  }

  /// Throws std::invalid_argument naming the first table entry that is not finite. Call it after
  /// writing through parameters() or table() (load_parameters does).
  void validate() const {
    for (index_t n = 0; n < table_.size(); ++n)
      if (!std::isfinite(table_[n]))
        throw std::invalid_argument("relbias::t5: table entry (bucket " + std::to_string(n / num_heads_) + ", head " +
                                    std::to_string(n % num_heads_) + ") must be finite, got " + std::to_string(double(table_[n])));
  }

  index_t num_heads() const noexcept { return num_heads_; }
  /// What a parameter file records of the policy (train.hpp):
  /// "t5(heads 4, buckets 32, max_distance 128, causal)".
  std::string configuration() const {
    return "t5(heads " + std::to_string(num_heads_) + ", buckets " + std::to_string(num_buckets_) + ", max_distance " +
           std::to_string(max_distance_) + ", " + masking_name(mode_) + ")";
  }
  index_t num_buckets() const noexcept { return num_buckets_; }
  index_t max_distance() const noexcept { return max_distance_; }
  masking mode() const noexcept { return mode_; }

  /// Bucket of the library's delta = i - j, i.e. HF's bucket of relative_position = -delta.
  /// Distances from the start of the last bucket on skip the logarithm: kernels tabulate every
  /// offset of a call, and a 32K-key decoding step would otherwise take 64K logarithms per head.
  index_t bucket(index_t delta) const noexcept {
    if (saturation_ > 0) {
      if (delta >= saturation_) return bucketing_.last();  // key far in the past
      if (bucketing_.bidirectional() && delta <= -saturation_) return bucketing_.per_side() + bucketing_.last();
    }
    return bucketing_(detail::t5_negate(delta));
  }

  Scalar at_offset(index_t h, index_t delta) const noexcept {
    RELBIAS_ASSERT(h >= 0 && h < num_heads_);
    return table_[bucket(delta) * num_heads_ + h];
  }
  Scalar operator()(index_t h, index_t i, index_t j) const noexcept { return at_offset(h, relative_offset(i, j)); }

  /// Every parameter, element (bucket, h) at bucket * H + h.
  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {table_.data(), table_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {table_.data(), table_.size()}; }
  /// The same storage as a (num_buckets, H) row-major matrix, HF's weight as it is stored.
  Eigen::Map<table_matrix> table() noexcept { return {table_.data(), num_buckets_, num_heads_}; }
  Eigen::Map<const table_matrix> table() const noexcept { return {table_.data(), num_buckets_, num_heads_}; }

  /// HF's _init_weights: normal(0, factor * d_model^-0.5), drawn in parameters() order from
  /// detail::random_stream (the same numbers on every standard library, not PyTorch's).
  void reset_parameters(std::uint64_t seed, double d_model, double factor = 1.0) {
    if (!(d_model > 0) || !std::isfinite(d_model))
      throw std::invalid_argument("relbias::t5::reset_parameters: d_model must be finite and > 0, got d_model=" +
                                  std::to_string(d_model));
    if (!(factor >= 0) || !std::isfinite(factor))
      throw std::invalid_argument("relbias::t5::reset_parameters: factor must be finite and >= 0, got factor=" +
                                  std::to_string(factor));
    detail::random_stream rng(seed);
    const double std = factor * std::pow(d_model, -0.5);
    for (Scalar& value : table_) value = Scalar(rng.normal(0.0, std));
  }

  /// d_bias[k] = dL/dbias summed over the cells with i - j == delta_lo + k (head h). Every offset
  /// feeds the entry of its bucket: grad[bucket(delta) * H + h] += d_bias[k].
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const {
    RELBIAS_ASSERT(index_t(grad.size()) == table_.size() && h >= 0 && h < num_heads_);
    for (std::size_t k = 0; k < d_bias.size(); ++k)
      grad[std::size_t(bucket(delta_lo + index_t(k)) * num_heads_ + h)] += d_bias[k];
  }

 private:
  index_t num_heads_, num_buckets_, max_distance_;
  masking mode_;
  detail::t5_bucketing bucketing_;
  param_vector<Scalar> table_;  // [num_buckets][H]
  index_t saturation_ = 0;      // first distance in the last bucket of a side; 0: never (no shortcut)
};

static_assert(shift_invariant_bias<t5<float>> && shift_invariant_bias<t5<double>>);
static_assert(learned_bias<t5<float>> && learned_bias<t5<double>>);
static_assert(offset_differentiable_bias<t5<float>> && offset_differentiable_bias<t5<double>>);

}  // namespace relbias
