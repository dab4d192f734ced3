#pragma once
// KERPLE: kernelized relative positional biases with learned per-head kernels.
// Sources: Chi, Fan, Ramadge, Rudnicky, "KERPLE: Kernelized Relative Positional Embedding for
//   Length Extrapolation" (NeurIPS 2022); chijames/KERPLE megatron/mpu/layers.py
//   (ParallelKerplePower with pos_emb kerple_power_ap_, ParallelKerpleLog): initialisation,
//   eps = 1e-2 and the clamps of project(); megatron/model/gpt2_model.py (one instance shared by
//   all layers: per head, shared across layers).
//
// Parameter naming: the paper's r1 (outer scale) and r2 (exponent / inner scale). The reference
// code calls them bias_a / bias_p in the power class but bias_p / bias_a in the log class; both
// are mapped to r1 / r2 here, so r1 is always the outer scale.
//
// The reference code builds tril(i - j) for causal attention; on the keys a causal query sees that
// is d = |i - j|, the paper's |m - n|. Using |i - j| everywhere also gives the natural
// bidirectional extension, so no masking mode is needed.

#include "relbias/concepts.hpp"
#include "relbias/detail/random.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace relbias {

namespace detail {

// Shortest round-trip text of a value for error messages (std::to_string prints 1e-9 as 0.000000).
inline std::string kerple_value_text(double value) {
  char text[32];
  const auto end = std::to_chars(text, text + sizeof text, value).ptr;
  return std::string(text, end);
}

// b = -r1 * d^r2. Paper constraints r1 > 0, 0 < r2 <= 2 (conditionally positive definite kernel).
struct kerple_power_kernel {
  static constexpr const char* name = "relbias::kerple_power";
  static constexpr double r1_init_scale = 1.0;  // bias_a = torch.rand * 1
  static constexpr double r2_init_scale = 2.0;  // bias_p = torch.rand * 2
  static constexpr double r2_max = 2.0;         // bias_p.clamp(min=eps, max=2)
  static constexpr const char* r2_range = "in (0, 2]";

  template <class S>
  static S value(S r1, S r2, S d) { return -r1 * std::pow(d, r2); }
  // In place over an array of distances. float: exp(r2 log d) in double packets, whose error
  // (|r2 log d| double ulps) is far below a float ulp, over an aligned stack chunk so the result
  // does not depend on d's address (see kerple_log_kernel); double keeps the scalar pow.
  template <class S>
  static void values(S r1, S r2, Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> d) {
    if constexpr (std::is_same_v<S, float>) {
      constexpr Eigen::Index chunk = 512;  // on the stack and in L1: no allocation per call
      constexpr Eigen::Index lanes = Eigen::internal::packet_traits<double>::size;
      Eigen::Array<double, chunk, 1> wide;
      for (Eigen::Index start = 0; start < d.size(); start += chunk) {
        // Whole packets, as kerple_log_kernel: no distance takes the scalar tail.
        const Eigen::Index n = std::min(chunk, d.size() - start), padded = (n + lanes - 1) / lanes * lanes;
        wide.segment(n, padded - n).setOnes();
        wide.head(n) = d.segment(start, n).template cast<double>();
        auto part = wide.head(padded);
        part = -double(r1) * (double(r2) * part.log()).exp();  // log 0 = -inf: 0^r2 = 0
        d.segment(start, n) = wide.head(n).template cast<float>();  // own pass: a cast inside kept log and exp scalar
      }
    } else {
      d = d.unaryExpr([=](S x) { return value(r1, r2, x); });
    }
  }

  // db/dr1 = -d^r2, db/dr2 = -r1 d^r2 ln d; at d = 0 PyTorch's pow backward gives 0 for the
  // exponent (d^r2 = 0 there), so ln 0 is never evaluated.
  template <class S>
  static void gradient(S r1, S r2, S d, S& d_r1, S& d_r2) {
    const S power = std::pow(d, r2);
    d_r1 = -power;
    d_r2 = d > S(0) ? -r1 * power * std::log(d) : S(0);
  }
};

// b = -r1 * log(1 + r2 d). Paper constraints r1 > 0, r2 > 0.
struct kerple_log_kernel {
  static constexpr const char* name = "relbias::kerple_log";
  static constexpr double r1_init_scale = 2.0;  // bias_p = torch.rand * 2 (the outer scale here)
  static constexpr double r2_init_scale = 1.0;  // bias_a = torch.rand * 1
  static constexpr double r2_max = std::numeric_limits<double>::infinity();  // clamp(min=eps) only
  static constexpr const char* r2_range = "finite and > 0";

  // log1p: the reference's log(1 + a d) without the cancellation for small a d.
  template <class S>
  static S value(S r1, S r2, S d) { return -r1 * std::log1p(r2 * d); }
  // In place over an array of distances: Eigen's log1p runs in packets (a few ulps from log1p).
  // Eigen takes scalar log1p before the first aligned address and after the last whole packet,
  // so the work goes through an aligned stack chunk padded to whole packets: every distance
  // gets the packet log1p, the same bits wherever it sits in the table (a sequence then gets
  // the same bias in a batch as alone, whatever offsets the rest of the batch adds).
  template <class S>
  static void values(S r1, S r2, Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> d) {
    constexpr Eigen::Index chunk = 512;  // on the stack and in L1: no allocation per call
    constexpr Eigen::Index lanes = Eigen::internal::packet_traits<S>::size;
    static_assert(chunk % lanes == 0, "a chunk holds whole packets");
    Eigen::Array<S, chunk, 1> aligned;
    for (Eigen::Index start = 0; start < d.size(); start += chunk) {
      const Eigen::Index n = std::min(chunk, d.size() - start), padded = (n + lanes - 1) / lanes * lanes;
      aligned.segment(n, padded - n).setZero();
      aligned.head(n) = d.segment(start, n);
      auto part = aligned.head(padded);
      part = -r1 * (r2 * part).log1p();
      d.segment(start, n) = aligned.head(n);
    }
  }

  // db/dr1 = -ln(1 + r2 d), db/dr2 = -r1 d / (1 + r2 d).
  template <class S>
  static void gradient(S r1, S r2, S d, S& d_r1, S& d_r2) {
    d_r1 = -std::log1p(r2 * d);
    d_r2 = -r1 * d / (S(1) + r2 * d);
  }
};

/// Everything the two KERPLE kernels share: the flat parameters [r1 (H), r2 (H)], construction,
/// the projection and the offset gradient. Kernel supplies the formula and its constants.
template <std::floating_point Scalar, class Kernel>
class kerple_policy {
 public:
  using scalar_type = Scalar;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = true;
  /// The reference's eps: the lower clamp of every parameter in project().
  static constexpr Scalar projection_eps = Scalar(1e-2);

  /// Reference initialisation (torch.rand scaled per parameter, see the kernel), then project().
  explicit kerple_policy(index_t num_heads, std::uint64_t seed = 0) : values_(checked_heads(num_heads) * 2) {
    random_stream rng(seed);
    for (index_t h = 0; h < num_heads; ++h) r1()[h] = Scalar(rng.uniform(0.0, Kernel::r1_init_scale));
    for (index_t h = 0; h < num_heads; ++h) r2()[h] = Scalar(rng.uniform(0.0, Kernel::r2_init_scale));
    project();
  }

  /// Explicit per-head values, stored as given (no projection). Throws std::invalid_argument
  /// unless both spans have the same nonzero size and every value meets the paper's constraints.
  kerple_policy(std::span<const Scalar> r1_values, std::span<const Scalar> r2_values) {
    check_sizes(r1_values, r2_values);
    const index_t num_heads = index_t(r1_values.size());
    values_.resize(2 * num_heads);
    std::copy(r1_values.begin(), r1_values.end(), r1().data());
    std::copy(r2_values.begin(), r2_values.end(), r2().data());
    validate();
  }

  /// Throws std::invalid_argument naming the first value outside the paper's constraints (r1 > 0,
  /// r2 in the kernel's range, all finite). Subnormal values are rejected too: the fused kernels
  /// run with subnormals flushed to zero, where r2 = 1e-45 would become 0 and 0^0 = 1 (power).
  /// Call it after writing through parameters() (load_parameters does); the constructors call it.
  void validate() const {
    for (index_t h = 0; h < num_heads(); ++h) {
      check_value("r1", h, r1()[h], std::numeric_limits<double>::infinity(), "finite and > 0");
      check_value("r2", h, r2()[h], Kernel::r2_max, Kernel::r2_range);
    }
  }

  index_t num_heads() const noexcept { return values_.size() / 2; }
  /// What a parameter file records of the policy (train.hpp): "kerple_log(heads 8)".
  std::string configuration() const {
    return std::string(Kernel::name + std::strlen("relbias::")) + "(heads " + std::to_string(num_heads()) + ")";
  }

  /// Bias of head h at offset delta = i - j (a function of |delta| only).
  Scalar at_offset(index_t h, index_t delta) const {
    RELBIAS_ASSERT(h >= 0 && h < num_heads());
    return Kernel::value(r1()[h], r2()[h], Scalar(distance(delta, 0)));
  }
  Scalar operator()(index_t h, index_t i, index_t j) const { return at_offset(h, relative_offset(i, j)); }

  /// out[t] = at_offset(h, max_offset - t) up to a few ulps: the fused kernels' offset table in
  /// one array pass (a decoding step tabulates Lk offsets per head, one logarithm each).
  void fill_offsets(index_t h, index_t max_offset, std::span<Scalar> out) const {
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> d(out.data(), index_t(out.size()));
    for (index_t t = 0; t < d.size(); ++t) d[t] = Scalar(distance(max_offset - t, 0));
    Kernel::values(r1()[h], r2()[h], d);
  }

  /// All parameters, laid out [r1 (H), r2 (H)].
  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {values_.data(), values_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {values_.data(), values_.size()}; }
  /// The outer scales r1 (H) and the exponents / inner scales r2 (H).
  Eigen::Map<param_vector<Scalar>> r1() noexcept { return {values_.data(), num_heads()}; }
  Eigen::Map<const param_vector<Scalar>> r1() const noexcept { return {values_.data(), num_heads()}; }
  Eigen::Map<param_vector<Scalar>> r2() noexcept { return {values_.data() + num_heads(), num_heads()}; }
  Eigen::Map<const param_vector<Scalar>> r2() const noexcept { return {values_.data() + num_heads(), num_heads()}; }

  /// The reference's projection after an optimiser step: every value clamped to >= eps = 1e-2,
  /// the power exponent also to <= 2. Like torch.clamp it leaves NaN as NaN.
  void project() noexcept {
    const Scalar upper = Scalar(Kernel::r2_max);
    for (index_t h = 0; h < num_heads(); ++h) {
      r1()[h] = std::max(r1()[h], projection_eps);  // std::max(NaN, eps) returns the NaN
      r2()[h] = std::min(std::max(r2()[h], projection_eps), upper);
    }
  }

  /// dL/d(r1_h, r2_h) += sum_k d_bias[k] * db(delta_lo + k)/d(r1_h, r2_h), where d_bias[k] is
  /// dL/dbias summed over the cells with i - j == delta_lo + k. grad is laid out like parameters().
  void accumulate_offset_gradient(index_t h, index_t delta_lo, std::span<const Scalar> d_bias,
                                  std::span<Scalar> grad) const {
    RELBIAS_ASSERT(index_t(grad.size()) == values_.size() && h >= 0 && h < num_heads());
    Scalar sum_r1 = 0, sum_r2 = 0;
    for (std::size_t k = 0; k < d_bias.size(); ++k) {
      if (d_bias[k] == Scalar(0)) continue;  // masked or out-of-window offsets cost nothing
      Scalar d_r1, d_r2;
      Kernel::gradient(r1()[h], r2()[h], Scalar(distance(delta_lo + index_t(k), 0)), d_r1, d_r2);
      sum_r1 += d_bias[k] * d_r1;
      sum_r2 += d_bias[k] * d_r2;
    }
    grad[std::size_t(h)] += sum_r1;
    grad[std::size_t(num_heads() + h)] += sum_r2;
  }

 private:
  // 2H values must fit in one allocation.
  static constexpr index_t max_heads = max_elements<Scalar>() / 2;

  static index_t checked_heads(index_t num_heads) {
    if (num_heads < 1 || num_heads > max_heads)
      throw std::invalid_argument(std::string(Kernel::name) + ": num_heads must be in [1, " + std::to_string(max_heads) +
                                  "] (2 * num_heads parameters), got " + std::to_string(num_heads));
    return num_heads;
  }

  static void check_sizes(std::span<const Scalar> r1_values, std::span<const Scalar> r2_values) {
    const std::size_t r1_size = r1_values.size(), r2_size = r2_values.size();
    if (r1_size == 0 || r1_size != r2_size || r1_values.data() == nullptr || r2_values.data() == nullptr)
      throw std::invalid_argument(std::string(Kernel::name) + ": r1 and r2 need one value per head (same nonzero size, with data), got r1.size()=" +
                                  std::to_string(r1_size) + ", r2.size()=" + std::to_string(r2_size));
    checked_heads(index_t(r1_size));
  }

  // Valid: finite, normal (not subnormal), > 0 and <= upper.
  static void check_value(const char* name, index_t h, Scalar value, double upper, const char* range) {
    if (std::isfinite(value) && value >= std::numeric_limits<Scalar>::min() && double(value) <= upper) return;
    const bool subnormal = value > Scalar(0) && value < std::numeric_limits<Scalar>::min();
    throw std::invalid_argument(std::string(Kernel::name) + ": " + name + " of head " + std::to_string(h) + " must be " + range +
                                (subnormal ? " and not subnormal" : "") + ", got " + kerple_value_text(double(value)));
  }

  param_vector<Scalar> values_;  // (2H): [r1 (H), r2 (H)]
};

}  // namespace detail

/// KERPLE power: b(h, i, j) = -r1_h * |i - j|^r2_h  (Chi et al., NeurIPS 2022; kerple_power_ap_).
///   r1_h > 0 outer scale, 0 < r2_h <= 2 exponent; init r1 ~ U(0, 1), r2 ~ U(0, 2), then project()
/// Learned params: 2H, layout [r1 (H), r2 (H)] | Cost: one pow per offset (tabulated per call)
/// Valid: H >= 1; explicit values r1 > 0, 0 < r2 <= 2, none subnormal (validate()); project() clamps
///   r1 >= 1e-2, r2 in [1e-2, 2]
/// Example: const double r1[] = {0.5}, r2[] = {2.0};  relbias::kerple_power<double> b{r1, r2};
///          b(0, 5, 2) == -4.5
template <std::floating_point Scalar>
class kerple_power : public detail::kerple_policy<Scalar, detail::kerple_power_kernel> {
 public:
  using detail::kerple_policy<Scalar, detail::kerple_power_kernel>::kerple_policy;
};

/// KERPLE log: b(h, i, j) = -r1_h * log(1 + r2_h |i - j|)  (Chi et al., NeurIPS 2022; kerple_log).
///   r1_h > 0 outer scale, r2_h > 0 inner scale; init r1 ~ U(0, 2), r2 ~ U(0, 1), then project()
/// Learned params: 2H, layout [r1 (H), r2 (H)] | Cost: one log1p per offset (tabulated per call)
/// Valid: H >= 1; explicit values r1, r2 > 0, finite, not subnormal (validate()); project() clamps
///   both to >= 1e-2
/// Example: const double r1[] = {2.0}, r2[] = {1.0};  relbias::kerple_log<double> b{r1, r2};
///          b(0, 4, 1) == -2 log(4) == -2.772588722239781
template <std::floating_point Scalar>
class kerple_log : public detail::kerple_policy<Scalar, detail::kerple_log_kernel> {
 public:
  using detail::kerple_policy<Scalar, detail::kerple_log_kernel>::kerple_policy;
};

static_assert(offset_differentiable_bias<kerple_power<float>> && offset_differentiable_bias<kerple_power<double>>);
static_assert(offset_differentiable_bias<kerple_log<float>> && offset_differentiable_bias<kerple_log<double>>);

}  // namespace relbias
