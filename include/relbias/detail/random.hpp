#pragma once
// A small seeded generator for parameter initialisation. The standard distributions are
// implementation-defined, so the same seed would give different weights on libstdc++ and
// libc++; this one gives the same numbers everywhere.

#include <cmath>
#include <cstdint>
#include <numbers>

namespace relbias::detail {

/// splitmix64 (Steele, Lea, Flood 2014): a full-period 64-bit generator.
class random_stream {
 public:
  explicit random_stream(std::uint64_t seed) noexcept : state_(seed) {}

  std::uint64_t next() noexcept {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  /// Uniform in [0, 1) with 53 random bits.
  double uniform() noexcept { return double(next() >> 11) * 0x1.0p-53; }
  // std::fma: a fused multiply-add by definition, so the value does not depend on whether the
  // compiler contracts lo + span * u at this call site (GCC does in GNU mode, per inlining).
  double uniform(double lo, double hi) noexcept { return std::fma(hi - lo, uniform(), lo); }

  /// Normal(mean, std) by Box-Muller (one value per call; 1 - u keeps the log finite).
  double normal(double mean, double std) noexcept {
    const double radius = std::sqrt(-2.0 * std::log(1.0 - uniform()));
    return std::fma(std * radius, std::cos(2.0 * std::numbers::pi * uniform()), mean);
  }

 private:
  std::uint64_t state_;
};

}  // namespace relbias::detail
