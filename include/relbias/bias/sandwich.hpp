#pragma once
// Sandwich: the inner product of two sinusoidal position embeddings as a parameter-free bias.
// Sources: Chi, Fan, Rudnicky, Ramadge, "Dissecting Transformer Length Extrapolation via the Lens
//   of Receptive Field Analysis" (ACL 2023, arXiv 2212.10356): Sandwich is the inner product of
//   the sinusoidal embeddings of the two positions, p_m . p_n = sum_k cos((m - n) w_k) (abstract),
//   compressed per head by ALiBi's h_n = n * 8 / H, n = 1 .. H
//   (Figure 1's caption);
//   NVIDIA/NeMo nemo/collections/nlp/modules/common/megatron/position_embedding/
//   sandwich_relative_position_embedding.py (SandwichRelativePositionEmbedding.forward, added in
//   NeMo PR #6666), and language_model.py, which constructs it with hidden_size = the head
//   dimension (kv_channels, or hidden_size // num_attention_heads).
//
// What we implement is NeMo's forward, term for term:
//   bias(h, i, j) = (sum_{k=1}^{d/2} cos(|i - j| * 10000^(-2k/d)) - d/2) / ((h + 1) * 8 / H)
// * The frequencies run over k = 1 .. d/2 (torch.arange(1, d/2 + 1)), not Vaswani's 0 .. d/2 - 1:
//   the fastest is 10000^(-2/d), the slowest exactly 1e-4.
// * d is a parameter with no default: NeMo sets it to the head dimension, so pass your model's
//   head dimension to do what NeMo does (the paper's choice of d could not be checked here).
// * d/2 is subtracted, so the bias is 0 at i == j and <= 0 elsewhere. Whether or not the paper
//   subtracts it, the attention is the same: a per-head constant cancels in the softmax. We keep
//   it because it keeps the bias near zero, where float has most precision.
// * Sign and scale: the sum is divided by h_n = 8 n / H for head n = h + 1 (head 0 keeps the
//   sharpest bias, as ALiBi's first head has the steepest slope).
// * Masking: NeMo builds |i - j| (build_relative_position) and, for causal attention, zeroes the
//   future offsets with tril; those keys are masked anyway. cos is even, so the bias is a function
//   of |i - j| and the same policy serves both masks: no mode argument (as KERPLE).
// * Arithmetic: NeMo computes in float32 on the device. We compute in double and round once to
//   Scalar, and evaluate cos(x) - 1 as -2 sin^2(x / 2): for small |i - j| the sum of cosines and
//   d/2 agree in most digits, and the subtraction would cancel them.
// * The fused kernels do not call at_offset per head and offset (H d/2 sines each: a decoding step
//   over 32768 keys took 8x one without a bias): make_plan sums once per distance of the call,
//   each sine from anchors 64 distances apart by the angle addition, then divides per head. Its
//   values are at_offset's up to a few double roundings of the angles before the one rounding to
//   Scalar: as floats the same in nearly every case, else one rounding apart (tested).
// Verified: every constant above against NeMo's code (which cites the paper). Not verified: the
// paper's Sandwich equation itself (its index range of k, whether it subtracts d/2); only the
// abstract and Figure 1's caption could be read when this was written.

#include "relbias/concepts.hpp"
#include "relbias/detail/bias_plan.hpp"
#include "relbias/offset.hpp"

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace relbias {

namespace detail {

/// S(x) = sum_k -2 sin^2(x a_k), a_k = w_k / 2, for the distances x in [first, first + count):
/// the sum Sandwich divides per head. Each sine by the angle addition sin(A + B) = sin A cos B +
/// cos A sin B from x = 64 m + r, the sines and cosines of 64 m a_k (once per 64 distances) and of
/// r a_k (r < 64, once per call) from libm: a few double roundings from the direct sine of
/// x a_k, whatever the window (a value depends on x only), and the terms summed in the same
/// order k = 1 .. d/2. The loops run over distances, innermost, so they vectorise.
inline std::vector<double> sandwich_distance_sums(std::span<const double> frequencies, index_t first, index_t count) {
  constexpr index_t step = 64;
  const std::size_t terms = frequencies.size();
  std::vector<double> sin_r(terms * step), cos_r(terms * step);  // [k][r]
  for (std::size_t k = 0; k < terms; ++k)
    for (index_t r = 0; r < step; ++r) {
      const double angle = 0.5 * double(r) * frequencies[k];
      sin_r[k * step + std::size_t(r)] = std::sin(angle), cos_r[k * step + std::size_t(r)] = std::cos(angle);
    }
  std::vector<double> sums(std::size_t(count), 0.0);
  for (index_t x = first; x < first + count;) {  // the distances of anchor 64 m: [x, end)
    const index_t anchor = x / step * step, end = std::min(first + count, anchor + step);
    double* out = sums.data() + (x - first);
    for (std::size_t k = 0; k < terms; ++k) {
      const double angle = 0.5 * double(anchor) * frequencies[k], sin_a = std::sin(angle), cos_a = std::cos(angle);
      const double* sin_b = sin_r.data() + k * step + (x - anchor);  // B = r a_k from r = x - anchor on
      const double* cos_b = cos_r.data() + k * step + (x - anchor);
      for (index_t n = 0; n < end - x; ++n) {
        const double s = sin_a * cos_b[n] + cos_a * sin_b[n];
        out[n] -= 2.0 * s * s;
      }
    }
    x = end;
  }
  return sums;
}

/// Sandwich over one call's window: S(x) once per distance of the window, then each head's table
/// S(|delta|) / h_n as the offset-table plan holds it. Tabulating at_offset instead costs H d/2
/// sines per offset: a decoding step over 32768 keys took 8x a step without a bias.
template <class Scalar>
class sandwich_plan {
 public:
  sandwich_plan(std::span<const double> frequencies, std::span<const double> compressions, const position_window& window)
      : table_(index_t(compressions.size()), window) {
    const index_t lo = window.min_offset(), hi = window.max_offset();
    const index_t nearest = lo <= 0 && hi >= 0 ? 0 : std::min(distance(lo, 0), distance(hi, 0));
    const std::vector<double> sums = sandwich_distance_sums(frequencies, nearest, window.max_distance() - nearest + 1);
    for (index_t h = 0; h < index_t(compressions.size()); ++h) {
      Scalar* out = table_.head(h);
      for (index_t t = 0; t < table_.count(); ++t)
        out[t] = Scalar(sums[std::size_t(distance(hi - t, 0) - nearest)] / compressions[std::size_t(h)]);
    }
  }

  void add_row(index_t h, index_t i, index_t j0, index_t n, Scalar* row) const { add_values(row_values(h, i, j0), n, row); }
  const Scalar* row_values(index_t h, index_t i, index_t j0) const { return table_.row(h, i, j0); }

 private:
  offset_table<Scalar> table_;
};

}  // namespace detail

/// Sandwich: parameter-free sinusoidal bias (Chi et al., ACL 2023; NeMo's
/// SandwichRelativePositionEmbedding).
///   bias(h, i, j) = (sum_{k=1}^{d/2} cos(|i - j| / 10000^(2k/d)) - d/2) * H / (8 (h + 1))
///   d: the sinusoid dimension (NeMo: the head dimension); 0 at i == j, <= 0 elsewhere, not monotone
/// Learned params: none | Cost: d/2 sines per offset (tabulated per call) | Valid: H >= 1, d even >= 2
/// Example: relbias::sandwich<double> b{8, 64};  b(0, 5, 2) == -4.42297900107037 (to 1e-14)
template <std::floating_point Scalar>
class sandwich {
 public:
  using scalar_type = Scalar;
  static constexpr bool is_learned = false;
  static constexpr bool is_shift_invariant = true;

  /// num_heads H and the sinusoid dimension d (even: d/2 cosine terms). Throws
  /// std::invalid_argument naming the argument and the value otherwise.
  sandwich(index_t num_heads, index_t dim) {
    if (num_heads < 1 || num_heads > max_size)
      throw std::invalid_argument("relbias::sandwich: num_heads must be in [1, " + std::to_string(max_size) + "], got " +
                                  std::to_string(num_heads));
    if (dim < 2 || dim % 2 != 0 || dim / 2 > max_size)
      throw std::invalid_argument("relbias::sandwich: dim must be even and in [2, " + std::to_string(2 * max_size) +
                                  "], got " + std::to_string(dim));
    dim_ = dim;
    frequencies_.resize(std::size_t(dim / 2));
    for (index_t k = 1; k <= dim / 2; ++k)
      frequencies_[std::size_t(k - 1)] = 1.0 / std::pow(10000.0, 2.0 * double(k) / double(dim));
    scales_.resize(std::size_t(num_heads));
    for (index_t h = 0; h < num_heads; ++h) scales_[std::size_t(h)] = double(h + 1) * 8.0 / double(num_heads);
  }

  index_t num_heads() const noexcept { return index_t(scales_.size()); }
  index_t dim() const noexcept { return dim_; }
  /// NeMo's divisor of head h: h_n = 8 (h + 1) / H.
  double compression(index_t h) const { return scales_[std::size_t(h)]; }

  /// Bias of head h at offset delta = i - j (a function of |delta| only).
  Scalar at_offset(index_t h, index_t delta) const {
    RELBIAS_ASSERT(h >= 0 && h < num_heads());
    const double x = double(distance(delta, 0));
    double sum = 0;  // sum_k (cos(x w_k) - 1), each term -2 sin^2(x w_k / 2): no cancellation
    for (const double w : frequencies_) {
      const double s = std::sin(0.5 * x * w);
      sum -= 2.0 * s * s;
    }
    return Scalar(sum / scales_[std::size_t(h)]);
  }
  Scalar operator()(index_t h, index_t i, index_t j) const { return at_offset(h, relative_offset(i, j)); }

  /// The fused kernels' plan for one call (detail::sandwich_plan): the values of at_offset within
  /// a few double roundings before the one rounding to Scalar, the sum once per distance.
  detail::sandwich_plan<Scalar> make_plan(const position_window& window) const { return {frequencies_, scales_, window}; }

 private:
  // H divisors and d/2 frequencies must each fit in one allocation.
  static constexpr index_t max_size = detail::max_elements<double>();

  index_t dim_ = 0;
  std::vector<double> frequencies_;  // (d/2): 10000^(-2k/d), k = 1 .. d/2
  std::vector<double> scales_;       // (H): 8 (h + 1) / H
};

static_assert(bias_policy<sandwich<float>> && bias_policy<sandwich<double>>);
static_assert(shift_invariant_bias<sandwich<float>> && shift_invariant_bias<sandwich<double>>);
static_assert(!learned_bias<sandwich<float>>);

}  // namespace relbias
