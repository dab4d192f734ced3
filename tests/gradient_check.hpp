#pragma once
// Finite-difference helpers shared by the policy gradient tests.

#include "catch.hpp"

#include <relbias/concepts.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

namespace relbias_test {

using relbias::index_t;
using relbias::param_vector;

/// A span over a parameter vector, for the policies' accumulate_*_gradient.
template <class Scalar>
std::span<Scalar> as_span(param_vector<Scalar>& v) {
  return {v.data(), std::size_t(v.size())};
}

/// dL/dtheta by the 5-point central difference (error O(step^4)) on a copy of the policy, with
/// step = relative_step * max(1, |theta_k|).
template <class Policy, class Loss>
param_vector<double> numeric_gradient(Policy policy, Loss loss, double relative_step = 1e-4) {
  auto theta = policy.parameters();
  param_vector<double> gradient(theta.size());
  for (index_t k = 0; k < theta.size(); ++k) {
    const double t = theta[k], step = relative_step * std::max(1.0, std::abs(t));
    auto at = [&](double v) {
      theta[k] = v;
      return loss(policy);
    };
    gradient[k] = (-at(t + 2 * step) + 8 * at(t + step) - 8 * at(t - step) + at(t - 2 * step)) / (12 * step);
    theta[k] = t;
  }
  return gradient;
}

/// |analytic - numeric| <= 1e-7 * max(|analytic|, 1e-2) for every parameter.
inline void check_gradients_match(const param_vector<double>& analytic, const param_vector<double>& numeric) {
  REQUIRE(analytic.size() == numeric.size());
  for (index_t k = 0; k < analytic.size(); ++k) {
    INFO("parameter " << k << ": analytic " << analytic[k] << ", numeric " << numeric[k]);
    CHECK(std::abs(analytic[k] - numeric[k]) <= 1e-7 * std::max(std::abs(analytic[k]), 1e-2));
  }
}

}  // namespace relbias_test
