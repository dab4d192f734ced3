#pragma once
// FIRE: Functional Interpolation for Relative positions improves long context transformers.
// Sources: Li, You, Bhojanapalli, Li, Rawat, Reddi, Ye, Chern, Yu, Guo, Kumar, "Functional
//   Interpolation for Relative Positions Improves Long Context Transformers" (ICLR 2024,
//   arXiv:2310.04418), the PyTorch listing of its appendix; mcleish7/arithmetic
//   cramming/architectures/embeddings.py (class FIRE: init_c = 0.1, init_L = 512 frozen,
//   L_multiplier = 1 learned, eps = 1e-6, Linear(1, 32) -> ReLU -> Linear(32, H)).
//
//   L        = |L_multiplier * init_L|                 (learned threshold)
//   psi(x)   = log(|c x| + 1)                          (c learned)
//   x(i, j)  = psi(|i - j|) / (psi(max(i, L)) + eps)   (i: absolute query position)
//   b(h,i,j) = MLP(x)[h],  MLP = Linear(1, width) -> ReLU -> Linear(width, H)
//
// Our choices where the sources are silent:
//  * Bidirectional attention uses |i - j| with the normaliser max(i, L). The paper defines FIRE for
//    causal models only; the reference code's abs(c * (i - j)) computes the same values above the
//    diagonal, which its causal mask hides. Using them is our extension, not the paper's.
//  * KV-cache decoding: the reference restarts positions at 0 on every call. Here i is always
//    the absolute query position (q_start + row), so a cached query normalises by its real
//    position, exactly as it would inside the full sequence.
//  * Gradients follow PyTorch's conventions: abs'(0) = 0, ReLU'(0) = 0, and torch.max(i, L) gives
//    each side half the gradient at a tie i == L.

#include "relbias/concepts.hpp"
#include "relbias/detail/fire_kernels.hpp"
#include "relbias/detail/random.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>

namespace relbias {

/// FIRE's hyper-parameters (the paper's and the reference code's defaults).
struct fire_config {
  index_t width = 32;    ///< hidden units of the MLP
  double init_L = 512;   ///< frozen base threshold; the learned L_multiplier scales it
  double eps = 1e-6;     ///< added to the normaliser
};

namespace detail {

// Shortest round-trip text of a value for error messages (std::to_string prints 1e-9 as 0.000000).
inline std::string fire_value_text(double value) {
  char text[32];
  const auto end = std::to_chars(text, text + sizeof text, value).ptr;
  return std::string(text, end);
}

template <class S>
void check_fire_arguments(index_t num_heads, const fire_config& config) {
  const std::string where = "relbias::fire: ";
  if (num_heads < 1) throw std::invalid_argument(where + "num_heads must be >= 1, got " + std::to_string(num_heads));
  if (config.width < 1) throw std::invalid_argument(where + "width must be >= 1, got " + std::to_string(config.width));
  // (2 + H) width + H + 2 parameters, each step checked against what one allocation holds.
  constexpr index_t limit = max_elements<S>();
  if (num_heads > limit - 2 || config.width > (limit - num_heads - 2) / (num_heads + 2))
    throw std::invalid_argument(where + "the parameter count (2 + num_heads) * width + num_heads + 2 overflows, got num_heads=" +
                                std::to_string(num_heads) + ", width=" + std::to_string(config.width));
  if (!(std::isfinite(S(config.init_L)) && S(config.init_L) > 0))
    throw std::invalid_argument(where + "init_L must be finite and > 0 in the scalar type, got " + fire_value_text(config.init_L));
  if (!(std::isfinite(config.eps) && S(config.eps) >= std::numeric_limits<S>::min()))
    throw std::invalid_argument(where + "eps must be finite and at least the smallest normal value of the scalar type, got " +
                                fire_value_text(config.eps));
}

// sgn(v) in {-1, 0, 1}: the derivative of |v|, 0 at 0 as in PyTorch.
template <class S>
S fire_sign(S v) noexcept { return S(int(S(0) < v) - int(v < S(0))); }

}  // namespace detail

/// FIRE (Li et al., ICLR 2024): a learned MLP of the log-normalised distance.
///   bias(h, i, j) = MLP(psi(|i - j|) / (psi(max(i, L)) + eps))[h],  psi(x) = log(|c x| + 1)
///   L = |L_multiplier * init_L|; i is the absolute query position (KV cache included)
/// Learned params: width (W1) + width (b1) + H width (W2) + H (b2) + c + L_multiplier
/// Cost: O(width) per (h, i, j); O(width H) for all heads of a cell | Not shift-invariant past L
/// Valid: H >= 1, width >= 1, init_L > 0, eps >= the smallest normal, every parameter finite
/// (validate()); built from a seed or from known weights
/// Example: relbias::fire<float> b{8};  b(h, i, j) == b(h, i + 5, j + 5) while i + 5 <= 512
template <std::floating_point Scalar>
class fire {
 public:
  using scalar_type = Scalar;
  static constexpr bool is_learned = true;
  static constexpr bool is_shift_invariant = false;  // the normaliser depends on i past L
  using weight_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// PyTorch's default Linear initialisation from the seed, c = 0.1, L_multiplier = 1.
  explicit fire(index_t num_heads, std::uint64_t seed = 0, fire_config config = {})
      : config_(config), heads_(checked_heads(num_heads, config)), init_L_(Scalar(config.init_L)), eps_(Scalar(config.eps)),
        params_(parameter_count()) {
    reset_parameters(seed);
  }

  /// Known weights (a checkpoint): W1 and b1 (width each), W2 (H x width, row-major: row h holds
  /// head h's output weights), b2 (H), c and L_multiplier. width and H come from the spans;
  /// config supplies init_L and eps (its width is replaced by W1.size()). Throws
  /// std::invalid_argument for inconsistent sizes or a value validate() rejects.
  fire(std::span<const Scalar> W1, std::span<const Scalar> b1, std::span<const Scalar> W2, std::span<const Scalar> b2,
       Scalar c, Scalar L_multiplier, fire_config config = {})
      : fire(checked_weight_heads(W1, b1, W2, b2), 0, with_width(config, index_t(W1.size()))) {
    std::copy(W1.begin(), W1.end(), this->W1().data());
    std::copy(b1.begin(), b1.end(), this->b1().data());
    std::copy(W2.begin(), W2.end(), this->W2().data());
    std::copy(b2.begin(), b2.end(), this->b2().data());
    this->c() = c;
    this->L_multiplier() = L_multiplier;
    validate();
  }

  /// Throws std::invalid_argument naming the first parameter that is not finite, or an L_multiplier
  /// whose threshold |L_multiplier * init_L| overflows. Call it after writing through parameters()
  /// (load_parameters does); the constructors call it.
  void validate() const {
    for (index_t n = 0; n < params_.size(); ++n)
      if (!std::isfinite(params_[n]))
        throw std::invalid_argument("relbias::fire: " + parameter_name(n) + " must be finite, got " +
                                    detail::fire_value_text(double(params_[n])));
    if (!std::isfinite(threshold()))
      throw std::invalid_argument("relbias::fire: L_multiplier * init_L must be finite, got L_multiplier=" +
                                  detail::fire_value_text(double(L_multiplier())) + ", init_L=" +
                                  detail::fire_value_text(double(init_L_)));
  }

  /// "W1[3]", "W2[1][0]", "c", ...: the name of parameters()[n].
  std::string parameter_name(index_t n) const {
    const auto at = [](const char* name, index_t k) { return std::string(name) + "[" + std::to_string(k) + "]"; };
    if (n < b1_index()) return at("W1", n);
    if (n < W2_index()) return at("b1", n - b1_index());
    if (n < b2_index()) return at("W2", (n - W2_index()) / width()) + "[" + std::to_string((n - W2_index()) % width()) + "]";
    if (n < c_index()) return at("b2", n - b2_index());
    return n == c_index() ? "c" : "L_multiplier";
  }

  /// W1, b1 ~ U(-1, 1) (fan_in = 1); W2, b2 ~ U(-1/sqrt(width), 1/sqrt(width)); c = 0.1;
  /// L_multiplier = 1. Drawn in layout order from detail::random_stream(seed).
  void reset_parameters(std::uint64_t seed) {
    detail::random_stream rng(seed);
    const double bound = 1.0 / std::sqrt(double(width()));
    for (index_t k = 0; k < c_index(); ++k) {  // W1, b1, W2, b2
      const double b = k < W2_index() ? 1.0 : bound;
      params_[k] = Scalar(rng.uniform(-b, b));
    }
    c() = Scalar(0.1);
    L_multiplier() = Scalar(1);
  }

  index_t num_heads() const noexcept { return heads_; }
  /// What a parameter file records of the policy (train.hpp):
  /// "fire(heads 8, width 32, init_L 512, eps 1e-06)".
  std::string configuration() const {
    return "fire(heads " + std::to_string(heads_) + ", width " + std::to_string(config_.width) + ", init_L " +
           detail::fire_value_text(double(init_L_)) + ", eps " + detail::fire_value_text(double(eps_)) + ")";
  }
  index_t width() const noexcept { return config_.width; }
  const fire_config& config() const noexcept { return config_; }

  Scalar operator()(index_t h, index_t i, index_t j) const { return mlp(h, input(i, j)); }

  // ---- Parameters: [W1 (width), b1 (width), W2 (H x width, row-major), b2 (H), c, L_multiplier]

  Eigen::Map<param_vector<Scalar>> parameters() noexcept { return {params_.data(), params_.size()}; }
  Eigen::Map<const param_vector<Scalar>> parameters() const noexcept { return {params_.data(), params_.size()}; }

  index_t W1_index() const noexcept { return 0; }
  index_t b1_index() const noexcept { return width(); }
  index_t W2_index() const noexcept { return 2 * width(); }
  index_t b2_index() const noexcept { return (2 + heads_) * width(); }
  index_t c_index() const noexcept { return b2_index() + heads_; }
  index_t L_multiplier_index() const noexcept { return c_index() + 1; }

  Eigen::Map<param_vector<Scalar>> W1() noexcept { return {params_.data() + W1_index(), width()}; }
  Eigen::Map<const param_vector<Scalar>> W1() const noexcept { return {params_.data() + W1_index(), width()}; }
  Eigen::Map<param_vector<Scalar>> b1() noexcept { return {params_.data() + b1_index(), width()}; }
  Eigen::Map<const param_vector<Scalar>> b1() const noexcept { return {params_.data() + b1_index(), width()}; }
  /// (H, width): row h holds the output weights of head h.
  Eigen::Map<weight_matrix> W2() noexcept { return {params_.data() + W2_index(), heads_, width()}; }
  Eigen::Map<const weight_matrix> W2() const noexcept { return {params_.data() + W2_index(), heads_, width()}; }
  Eigen::Map<param_vector<Scalar>> b2() noexcept { return {params_.data() + b2_index(), heads_}; }
  Eigen::Map<const param_vector<Scalar>> b2() const noexcept { return {params_.data() + b2_index(), heads_}; }
  Scalar& c() noexcept { return params_[c_index()]; }
  Scalar c() const noexcept { return params_[c_index()]; }
  Scalar& L_multiplier() noexcept { return params_[L_multiplier_index()]; }
  Scalar L_multiplier() const noexcept { return params_[L_multiplier_index()]; }
  Scalar init_L() const noexcept { return init_L_; }
  Scalar eps() const noexcept { return eps_; }

  // ---- Forward pieces (one definition, shared by operator() and the fused kernels)

  /// L = |L_multiplier * init_L|: rows with i <= L share one normaliser.
  Scalar threshold() const noexcept { return std::abs(L_multiplier() * init_L_); }
  /// psi(max(i, L)) + eps: the denominator of every input of query row i.
  Scalar normalizer(index_t i) const noexcept { return psi(std::max(Scalar(i), threshold())) + eps_; }
  /// psi(d) = log(|c| d + 1): the numerator for distance d = |i - j|.
  Scalar log_distance(index_t d) const noexcept { return psi(Scalar(d)); }
  /// x(i, j) = psi(|i - j|) / normalizer(i).
  Scalar input(index_t i, index_t j) const noexcept { return log_distance(distance(i, j)) / normalizer(i); }

  /// MLP(x)[h] = b2[h] + sum_k W2[h][k] relu(W1[k] x + b1[k]).
  Scalar mlp(index_t h, Scalar x) const noexcept {
    RELBIAS_ASSERT(h >= 0 && h < heads_);
    const Scalar *w1 = w1_data(), *b1 = b1_data(), *w2 = w2_data() + h * width();
    Scalar out = b2_data()[h];
    for (index_t k = 0; k < width(); ++k) out += w2[k] * std::max(w1[k] * x + b1[k], Scalar(0));
    return out;
  }

  /// out[h] = MLP(x)[h] for every head, the hidden layer evaluated once. Same operations in the
  /// same order as mlp(), so both give identical values.
  void mlp_all_heads(Scalar x, Scalar* out) const noexcept {
    const Scalar *w1 = w1_data(), *b1 = b1_data(), *w2 = w2_data();
    std::copy(b2_data(), b2_data() + heads_, out);
    for (index_t k = 0; k < width(); ++k) {
      const Scalar hidden = std::max(w1[k] * x + b1[k], Scalar(0));
      for (index_t h = 0; h < heads_; ++h) out[h] += w2[h * width() + k] * hidden;
    }
  }

  // ---- Backward pieces. grad is laid out like parameters().

  /// Adds g * d MLP(x)[h] / d(W1, b1, W2, b2) into grad and returns g * d MLP(x)[h] / dx.
  /// ReLU'(0) = 0. db2[h] receives g (in attention its row sum, and so its gradient, is 0).
  Scalar accumulate_mlp_gradient(index_t h, Scalar x, Scalar g, std::span<Scalar> grad) const {
    RELBIAS_ASSERT(index_t(grad.size()) == params_.size() && h >= 0 && h < heads_);
    const Scalar *w1 = w1_data(), *b1 = b1_data(), *w2 = w2_data() + h * width();
    Scalar* g_w1 = grad.data() + W1_index();
    Scalar* g_b1 = grad.data() + b1_index();
    Scalar* g_w2 = grad.data() + W2_index() + h * width();
    grad[std::size_t(b2_index() + h)] += g;
    Scalar dx = 0;
    for (index_t k = 0; k < width(); ++k) {
      const Scalar z = w1[k] * x + b1[k];
      if (!(z > Scalar(0))) continue;  // inactive unit: no gradient through it
      const Scalar dz = g * w2[k];
      g_w2[k] += g * z;
      g_w1[k] += dz * x;
      g_b1[k] += dz;
      dx += dz * w1[k];
    }
    return dx;
  }

  /// Adds dx * dx(i, j)/dc and dx * dx(i, j)/dL_multiplier into grad, for query position i and
  /// distance d = |i - j| (dx: the upstream gradient of the input x):
  ///   dx/dc  = (psi_c(d) den - num psi_c(N)) / den^2,   psi_c(v) = sgn(c v) v / (|c v| + 1)
  ///   dx/dLm = -num / den^2 * sgn(c N) c / (|c N| + 1) * dN/dL * sgn(Lm init_L) init_L
  /// with num = psi(d), N = max(i, L), den = psi(N) + eps, dN/dL = 1 (L > i), 1/2 (tie), 0.
  void accumulate_input_gradient(index_t i, index_t d, Scalar dx, std::span<Scalar> grad) const {
    RELBIAS_ASSERT(index_t(grad.size()) == params_.size());
    const Scalar position = Scalar(i), L = threshold(), n = std::max(position, L);
    const Scalar num = log_distance(d), den = psi(n) + eps_;
    grad[std::size_t(c_index())] += dx * (log_distance_derivative(d) * den - num * psi_dc(n)) / (den * den);
    const Scalar dn_dL = L > position ? Scalar(1) : (L == position ? Scalar(0.5) : Scalar(0));
    const Scalar dL_dLm = detail::fire_sign(L_multiplier() * init_L_) * init_L_;
    grad[std::size_t(L_multiplier_index())] += dx * (-num / (den * den)) * psi_dv(n) * dn_dL * dL_dLm;
  }

  /// grad += d_bias * d bias(h, i, j) / dtheta: the MLP backward, then the input's.
  void accumulate_gradient(index_t h, index_t i, index_t j, Scalar d_bias, std::span<Scalar> grad) const {
    const Scalar dx = accumulate_mlp_gradient(h, input(i, j), d_bias, grad);
    accumulate_input_gradient(i, distance(i, j), dx, grad);
  }

  /// The fused kernels' fast paths (detail/fire_kernels.hpp): the MLP once per distance for
  /// rows below L, vectorised per element above it.
  detail::fire_plan<fire> make_plan(const position_window& window) const { return {*this, window}; }
  detail::fire_gradient_accumulator<fire> make_gradient_accumulator(const position_window& window) const {
    return {*this, window};
  }

  /// d psi(d) / dc = sgn(c d) d / (|c d| + 1), for distance tables of the fused backward.
  Scalar log_distance_derivative(index_t d) const noexcept { return psi_dc(Scalar(d)); }
  /// d psi(v) / dc at a real argument v (the normaliser's N = max(i, L)).
  Scalar log_distance_derivative_real(Scalar v) const noexcept { return psi_dc(v); }

 private:
  static index_t checked_heads(index_t num_heads, const fire_config& config) {
    detail::check_fire_arguments<Scalar>(num_heads, config);
    return num_heads;
  }
  static index_t checked_weight_heads(std::span<const Scalar> W1, std::span<const Scalar> b1, std::span<const Scalar> W2,
                                      std::span<const Scalar> b2) {
    const std::size_t width = W1.size(), heads = b2.size();
    const bool null = (W1.data() == nullptr) || (b1.data() == nullptr) || (W2.data() == nullptr) || (b2.data() == nullptr);
    if (width == 0 || heads == 0 || null || b1.size() != width || W2.size() / width != heads || W2.size() % width != 0)
      throw std::invalid_argument("relbias::fire: weights need W1 and b1 of width values, W2 of H * width and b2 of H (all "
                                  "non-empty, with data), got W1.size()=" + std::to_string(W1.size()) + ", b1.size()=" +
                                  std::to_string(b1.size()) + ", W2.size()=" + std::to_string(W2.size()) +
                                  ", b2.size()=" + std::to_string(b2.size()));
    return index_t(heads);
  }
  static fire_config with_width(fire_config config, index_t width) {
    config.width = width;
    return config;
  }
  index_t parameter_count() const noexcept { return L_multiplier_index() + 1; }

  // log1p: the reference's log(|c v| + 1) without the cancellation for small |c v|.
  Scalar psi(Scalar v) const noexcept { return std::log1p(std::abs(c() * v)); }
  Scalar psi_dc(Scalar v) const noexcept { return detail::fire_sign(c() * v) * v / (std::abs(c() * v) + Scalar(1)); }
  Scalar psi_dv(Scalar v) const noexcept { return detail::fire_sign(c() * v) * c() / (std::abs(c() * v) + Scalar(1)); }

  const Scalar* w1_data() const noexcept { return params_.data() + W1_index(); }
  const Scalar* b1_data() const noexcept { return params_.data() + b1_index(); }
  const Scalar* w2_data() const noexcept { return params_.data() + W2_index(); }
  const Scalar* b2_data() const noexcept { return params_.data() + b2_index(); }

  fire_config config_;
  index_t heads_;
  Scalar init_L_;  // frozen (requires_grad=False in the reference), so not in parameters()
  Scalar eps_;
  param_vector<Scalar> params_;  // see parameters() for the layout
};

static_assert(cell_differentiable_bias<fire<float>> && cell_differentiable_bias<fire<double>>);
static_assert(!shift_invariant_bias<fire<double>>);

}  // namespace relbias
