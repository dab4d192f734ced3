#pragma once
// What a training loop needs around attention_backward: optimisers over a learned policy's
// flat parameters (with KERPLE's projection after each step) and parameter files.

#include "relbias/concepts.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace relbias {

namespace detail {

template <class Policy>
void check_gradient_size(const char* where, const Policy& policy, std::size_t gradient_size) {
  const auto expected = std::size_t(policy.parameters().size());
  if (gradient_size != expected)
    throw std::invalid_argument(std::string(where) + ": grad must hold the policy's " + std::to_string(expected) +
                                " parameters, got " + std::to_string(gradient_size));
}

/// After a step, policies with constraints (KERPLE) clamp their stored values, as the
/// reference code does at every forward.
template <class Policy>
void project_if_constrained(Policy& policy) {
  if constexpr (requires { policy.project(); }) policy.project();
}

}  // namespace detail

/// Stochastic gradient descent with PyTorch's momentum and (L2) weight decay:
///   g += weight_decay * p;  buf = momentum * buf + g;  p -= learning_rate * buf
template <std::floating_point Scalar>
struct sgd_options {
  Scalar learning_rate = Scalar(1e-2);
  Scalar momentum = 0;
  Scalar weight_decay = 0;
};

template <std::floating_point Scalar>
class sgd {
 public:
  explicit sgd(sgd_options<Scalar> options = {}) : options_(options) {}

  template <learned_bias Policy>
  void step(Policy& policy, std::span<const Scalar> grad) {
    detail::check_gradient_size("relbias::sgd::step", policy, grad.size());
    auto p = policy.parameters();
    const Eigen::Map<const param_vector<Scalar>> g(grad.data(), p.size());
    if (velocity_.size() != p.size()) velocity_ = param_vector<Scalar>::Zero(p.size());
    velocity_ = options_.momentum * velocity_ + g + options_.weight_decay * p;
    p -= options_.learning_rate * velocity_;
    detail::project_if_constrained(policy);
  }

 private:
  sgd_options<Scalar> options_;
  param_vector<Scalar> velocity_;
};

/// Adam (Kingma & Ba 2015) as PyTorch implements it, bias correction included, with L2 weight
/// decay added to the gradient:
///   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
template <std::floating_point Scalar>
struct adam_options {
  Scalar learning_rate = Scalar(1e-3);
  Scalar beta1 = Scalar(0.9);
  Scalar beta2 = Scalar(0.999);
  Scalar eps = Scalar(1e-8);
  Scalar weight_decay = 0;
};

template <std::floating_point Scalar>
class adam {
 public:
  explicit adam(adam_options<Scalar> options = {}) : options_(options) {}

  template <learned_bias Policy>
  void step(Policy& policy, std::span<const Scalar> grad) {
    detail::check_gradient_size("relbias::adam::step", policy, grad.size());
    auto p = policy.parameters();
    if (first_.size() != p.size()) {
      first_ = param_vector<Scalar>::Zero(p.size());
      second_ = param_vector<Scalar>::Zero(p.size());
      steps_ = 0;
    }
    const adam_options<Scalar>& o = options_;
    const param_vector<Scalar> g = Eigen::Map<const param_vector<Scalar>>(grad.data(), p.size()) + o.weight_decay * p;
    ++steps_;
    first_ = o.beta1 * first_ + (1 - o.beta1) * g;
    second_ = o.beta2 * second_ + (1 - o.beta2) * g.cwiseProduct(g);
    const Scalar first_correction = 1 - std::pow(o.beta1, Scalar(steps_));
    const Scalar second_correction = 1 - std::pow(o.beta2, Scalar(steps_));
    p.array() -= o.learning_rate * (first_.array() / first_correction) /
                 ((second_.array() / second_correction).sqrt() + o.eps);
    detail::project_if_constrained(policy);
  }

  std::int64_t steps() const noexcept { return steps_; }

 private:
  adam_options<Scalar> options_;
  param_vector<Scalar> first_, second_;
  std::int64_t steps_ = 0;
};

// Parameter files: "RELBIAS1" | format version (u32) | scalar size (u32) | count (u64) |
// FNV-1a 64 of the payload (u64) | payload (count scalars, native byte order).
namespace detail {

inline constexpr char parameter_magic[8] = {'R', 'E', 'L', 'B', 'I', 'A', 'S', '1'};
inline constexpr std::uint32_t parameter_format_version = 1;

struct parameter_header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t scalar_size;
  std::uint64_t count;
  std::uint64_t checksum;
};

inline std::uint64_t fnv1a64(const void* data, std::size_t size) {
  std::uint64_t hash = 0xcbf29ce484222325ull;
  for (std::size_t n = 0; n < size; ++n) hash = (hash ^ static_cast<const unsigned char*>(data)[n]) * 0x100000001b3ull;
  return hash;
}

[[noreturn]] inline void damaged(const std::filesystem::path& path, const std::string& what) {
  throw std::runtime_error("relbias::load_parameters: " + path.string() + ": " + what);
}

}  // namespace detail

/// Writes every parameter of the policy to path. Throws std::runtime_error if it cannot.
template <learned_bias Policy>
void save_parameters(const Policy& policy, const std::filesystem::path& path) {
  using S = typename Policy::scalar_type;
  const auto p = policy.parameters();
  const std::size_t bytes = std::size_t(p.size()) * sizeof(S);
  detail::parameter_header header{};
  std::memcpy(header.magic, detail::parameter_magic, sizeof header.magic);
  header.version = detail::parameter_format_version;
  header.scalar_size = sizeof(S);
  header.count = std::uint64_t(p.size());
  header.checksum = detail::fnv1a64(p.data(), bytes);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(&header), sizeof header);
  out.write(reinterpret_cast<const char*>(p.data()), std::streamsize(bytes));
  if (!out) throw std::runtime_error("relbias::save_parameters: cannot write " + path.string());
}

/// Reads parameters written by save_parameters into the policy. A file for another parameter
/// count or scalar type throws std::invalid_argument; an unreadable, truncated or damaged file
/// throws std::runtime_error naming the path. Either way the policy is left unchanged.
template <learned_bias Policy>
void load_parameters(Policy& policy, const std::filesystem::path& path) {
  using S = typename Policy::scalar_type;
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::damaged(path, "cannot open");
  detail::parameter_header header{};
  if (!in.read(reinterpret_cast<char*>(&header), sizeof header)) detail::damaged(path, "truncated header");
  if (std::memcmp(header.magic, detail::parameter_magic, sizeof header.magic) != 0)
    detail::damaged(path, "not a relbias parameter file (bad magic)");
  if (header.version != detail::parameter_format_version)
    detail::damaged(path, "format version " + std::to_string(header.version) + ", expected " +
                              std::to_string(detail::parameter_format_version));
  const auto expected = std::uint64_t(policy.parameters().size());
  if (header.scalar_size != sizeof(S) || header.count != expected)
    throw std::invalid_argument("relbias::load_parameters: " + path.string() + " holds " + std::to_string(header.count) +
                                " parameters of " + std::to_string(header.scalar_size) + " bytes, the policy has " +
                                std::to_string(expected) + " of " + std::to_string(sizeof(S)) + " bytes");
  std::vector<S> values(std::size_t(header.count));
  if (!in.read(reinterpret_cast<char*>(values.data()), std::streamsize(values.size() * sizeof(S))))
    detail::damaged(path, "truncated payload");
  if (in.peek() != std::char_traits<char>::eof()) detail::damaged(path, "trailing bytes after the payload");
  if (detail::fnv1a64(values.data(), values.size() * sizeof(S)) != header.checksum)
    detail::damaged(path, "checksum mismatch (damaged payload)");
  policy.parameters() = Eigen::Map<const param_vector<S>>(values.data(), index_t(values.size()));
}

}  // namespace relbias
