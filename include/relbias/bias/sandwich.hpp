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
// Verified: every constant above against NeMo's code (which cites the paper). Not verified: the
// paper's Sandwich equation itself (its index range of k, whether it subtracts d/2); only the
// abstract and Figure 1's caption could be read when this was written.

#include "relbias/concepts.hpp"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace relbias {

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
