#pragma once
// Runs the fused and the reference kernels on the same inputs, forward and backward, and compares
// them with NaN patterns required to match (the robustness tests and the fuzz driver share it).

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/attention_reference_backward.hpp>

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace relbias_test {

using relbias::index_t;

/// Everything one backward call writes.
template <class S>
struct gradients {
  relbias::tensor<S> dq, dk, dv;
  std::vector<S> bias_grad;
};

/// Both kernels' forward and backward results for one call.
template <class S>
struct kernel_pair {
  relbias::attention_result<S> fused, reference;
  gradients<S> fused_grad, reference_grad;
  bool backward_rejected = false;    // |lse| beyond detail::lse_limit: both backward kernels threw
  bool backward_unrejected = false;  // ... and one of them did not: a failure
};

template <class Bias>
std::size_t parameter_count(const Bias& bias) {
  if constexpr (relbias::learned_bias<Bias>) return std::size_t(bias.parameters().size());
  else return 0;
}

/// Forward with both kernels, then backward with both from the reference's O and lse (so the
/// backward comparison does not inherit forward rounding), d_out from `d_out`.
template <class Bias, class S = typename Bias::scalar_type>
kernel_pair<S> run_both(relbias::input_tensor<S> q, relbias::input_tensor<S> k, relbias::input_tensor<S> v,
                        relbias::input_tensor<S> d_out, const Bias& bias,
                        const std::type_identity_t<relbias::attention_options<S>>& options, bool with_backward = true) {
  kernel_pair<S> r{relbias::attention(q, k, v, bias, options), relbias::reference_attention(q, k, v, bias, options), {}, {}};
  if (!with_backward) return r;
  r.backward_rejected = std::any_of(r.reference.lse.begin(), r.reference.lse.end(), [](S x) {
    return std::isfinite(x) && std::abs(x) >= relbias::detail::lse_limit<S>();
  });
  for (gradients<S>* g : {&r.fused_grad, &r.reference_grad}) {
    g->dq = relbias::tensor<S>(q.batch, q.seq, q.heads, q.dim);
    g->dk = relbias::tensor<S>(k.batch, k.seq, k.heads, k.dim);
    g->dv = relbias::tensor<S>(v.batch, v.seq, v.heads, v.dim);
    g->bias_grad.assign(parameter_count(bias), S(0));
  }
  const auto o = r.reference.out.view();
  const std::span<const S> lse(r.reference.lse);
  if (r.backward_rejected) {  // both backward kernels must say so
    const auto throws_invalid = [](auto&& run) {
      try {
        run();
      } catch (const std::invalid_argument&) {
        return true;
      }
      return false;
    };
    r.backward_rejected =
        throws_invalid([&] {
          relbias::attention_backward(q, k, v, o, d_out, lse, bias, options, r.fused_grad.dq.view(), r.fused_grad.dk.view(),
                                      r.fused_grad.dv.view(), std::span<S>(r.fused_grad.bias_grad));
        }) &&
        throws_invalid([&] {
          relbias::reference_attention_backward(q, k, v, o, d_out, lse, bias, options, r.reference_grad.dq.view(),
                                                r.reference_grad.dk.view(), r.reference_grad.dv.view(),
                                                std::span<S>(r.reference_grad.bias_grad));
        });
    r.backward_unrejected = !r.backward_rejected;
    return r;
  }
  relbias::attention_backward(q, k, v, o, d_out, lse, bias, options, r.fused_grad.dq.view(), r.fused_grad.dk.view(),
                              r.fused_grad.dv.view(), std::span<S>(r.fused_grad.bias_grad));
  relbias::reference_attention_backward(q, k, v, o, d_out, lse, bias, options, r.reference_grad.dq.view(),
                                        r.reference_grad.dk.view(), r.reference_grad.dv.view(),
                                        std::span<S>(r.reference_grad.bias_grad));
  return r;
}

/// Empty when got and expected agree: the same NaN positions, the same infinities, and finite
/// values within tolerance * max(|expected|, scale); otherwise a description of the first miss.
/// With exact_nan false, got may be finite where expected is NaN (never the reverse): gradients
/// of the plain reference take 0 * NaN through whole products where the fused kernel skips the
/// tiles of hidden cells, so NaN inputs may reach more reference entries.
template <class S>
std::string compare_values(const char* name, std::span<const S> got, std::span<const S> expected, double tolerance,
                           double scale = 1.0, bool exact_nan = true) {
  if (got.size() != expected.size()) return std::string(name) + ": sizes differ";
  for (std::size_t n = 0; n < got.size(); ++n) {
    const double g = got[n], e = expected[n];
    const bool same = std::isinf(tolerance) ? !std::isnan(g) || std::isnan(e)  // NaN only where the reference has it
                      : std::isnan(e)       ? std::isnan(g) || !exact_nan
                      : std::isinf(e)       ? g == e
                                            : std::isfinite(g) && std::abs(g - e) <= tolerance * std::max(std::abs(e), scale);
    if (!same) return std::string(name) + "[" + std::to_string(n) + "]: got " + std::to_string(g) + ", expected " + std::to_string(e);
  }
  return {};
}

template <class S>
std::span<const S> values_of(const relbias::tensor<S>& t) {
  return {t.data(), std::size_t(t.size())};
}

/// Largest finite magnitude, at least 1: the scale of a gradient's absolute tolerance.
template <class S>
double finite_scale(std::span<const S> values) {
  double m = 1;
  for (const S x : values)
    if (std::isfinite(x)) m = std::max(m, double(std::abs(x)));
  return m;
}

/// Empty when the fused results match the reference (see compare_values); gradients are compared
/// relative to their largest finite entry, as sums over many cells lose relative precision. An
/// infinite gradient_tolerance checks only that the fused gradients have no NaN the reference
/// lacks (huge inputs make the gradients' rounding noise larger than the gradients).
template <class S>
std::string compare_pair(const kernel_pair<S>& r, double tolerance, double gradient_tolerance = -1,
                         double bias_gradient_tolerance = -1) {
  if (gradient_tolerance < 0) gradient_tolerance = tolerance;
  if (bias_gradient_tolerance < 0) bias_gradient_tolerance = gradient_tolerance;
  if (r.backward_unrejected) return "a backward kernel accepted an lse beyond detail::lse_limit";
  std::string miss = compare_values<S>("O", values_of(r.fused.out), values_of(r.reference.out), tolerance);
  if (miss.empty()) miss = compare_values<S>("lse", r.fused.lse, r.reference.lse, tolerance);
  const auto grad = [&](const char* name, std::span<const S> got, std::span<const S> expected) {
    if (miss.empty()) miss = compare_values<S>(name, got, expected, gradient_tolerance, finite_scale(expected), false);
  };
  grad("dq", values_of(r.fused_grad.dq), values_of(r.reference_grad.dq));
  grad("dk", values_of(r.fused_grad.dk), values_of(r.reference_grad.dk));
  grad("dv", values_of(r.fused_grad.dv), values_of(r.reference_grad.dv));
  if (miss.empty() && !std::isnan(bias_gradient_tolerance))  // NaN: not compared
    miss = compare_values<S>("bias_grad", r.fused_grad.bias_grad, r.reference_grad.bias_grad, bias_gradient_tolerance,
                             finite_scale<S>(r.reference_grad.bias_grad), false);
  return miss;
}

}  // namespace relbias_test
