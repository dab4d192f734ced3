#pragma once
// What a training loop needs around attention_backward: optimisers over a learned policy's
// flat parameters (with KERPLE's projection after each step) and parameter files.

#include "relbias/concepts.hpp"

#include <Eigen/Core>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <concepts>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#endif

namespace relbias {

namespace detail {

template <class Policy>
void check_gradient_size(const char* where, const Policy& policy, std::size_t gradient_size) {
  const auto expected = std::size_t(policy.parameters().size());
  if (gradient_size != expected)
    throw std::invalid_argument(std::string(where) + ": grad must hold the policy's " + std::to_string(expected) +
                                " parameters, got " + std::to_string(gradient_size));
}

/// Optimiser state belongs to one policy: stepping another policy with it would mix their
/// histories, so a size change after the first step is an error rather than a silent reset.
inline void check_state_size(const char* where, index_t state_size, index_t parameter_count) {
  if (state_size != 0 && state_size != parameter_count)
    throw std::invalid_argument(std::string(where) + ": this optimiser's state is for " + std::to_string(state_size) +
                                " parameters, the policy has " + std::to_string(parameter_count) +
                                " (use one optimiser per policy)");
}

/// Hyper-parameters are checked once, at construction (PyTorch rejects the same values).
template <class S>
void check_hyper(const char* where, const char* name, S value, bool valid, const char* range) {
  if (!valid || !std::isfinite(value))
    throw std::invalid_argument(std::string(where) + ": " + name + " must be finite and " + range + ", got " +
                                std::to_string(double(value)));
}

/// After a step, policies with constraints (KERPLE) clamp their stored values, as the
/// reference code does at every forward.
template <class Policy>
void project_if_constrained(Policy& policy) {
  if constexpr (requires { policy.project(); }) policy.project();
}

}  // namespace detail

/// SGD's hyper-parameters, for designated initialisation: sgd<float>{{.learning_rate = 0.1f}}.
template <std::floating_point Scalar>
struct sgd_options {
  Scalar learning_rate = Scalar(1e-3);  // PyTorch's default
  Scalar momentum = 0;
  Scalar weight_decay = 0;
};

/// Stochastic gradient descent with PyTorch's momentum (no dampening) and L2 weight decay:
///   g += weight_decay * p;  buf = momentum * buf + g  (buf = g at the first step);  p -= lr * buf
/// then policy.project() if the policy has one. Throws std::invalid_argument for a negative or
/// non-finite hyper-parameter.
template <std::floating_point Scalar>
class sgd {
 public:
  explicit sgd(Scalar learning_rate, Scalar momentum = 0, Scalar weight_decay = 0)
      : sgd(sgd_options<Scalar>{learning_rate, momentum, weight_decay}) {}
  explicit sgd(sgd_options<Scalar> options) : options_(options) {
    constexpr const char* where = "relbias::sgd";
    detail::check_hyper(where, "learning_rate", options.learning_rate, options.learning_rate >= 0, ">= 0");
    detail::check_hyper(where, "momentum", options.momentum, options.momentum >= 0, ">= 0");
    detail::check_hyper(where, "weight_decay", options.weight_decay, options.weight_decay >= 0, ">= 0");
  }

  /// grad is laid out like policy.parameters(); a size mismatch throws std::invalid_argument
  /// before anything changes.
  template <learned_bias Policy>
  void step(Policy& policy, std::span<const Scalar> grad) {
    static_assert(std::same_as<typename Policy::scalar_type, Scalar>,
                  "relbias::sgd: use sgd<typename Policy::scalar_type>, the policy's own scalar type");
    constexpr const char* where = "relbias::sgd::step";
    detail::check_gradient_size(where, policy, grad.size());
    auto p = policy.parameters();
    detail::check_state_size(where, velocity_.size(), p.size());
    if (velocity_.size() == 0) velocity_ = param_vector<Scalar>::Zero(p.size());
    // A plain loop: P is small, and GCC 12 reports false -Warray-bounds on Eigen's packet path
    // when it can see a short gradient's allocation.
    const sgd_options<Scalar>& o = options_;
    for (index_t n = 0; n < p.size(); ++n) {
      velocity_[n] = o.momentum * velocity_[n] + grad[std::size_t(n)] + o.weight_decay * p[n];
      p[n] -= o.learning_rate * velocity_[n];
    }
    detail::project_if_constrained(policy);
  }

  const sgd_options<Scalar>& options() const noexcept { return options_; }

 private:
  sgd_options<Scalar> options_;
  param_vector<Scalar> velocity_;  // (P), sized on the first step
};

/// Adam's hyper-parameters (PyTorch's defaults), for designated initialisation.
template <std::floating_point Scalar>
struct adam_options {
  Scalar learning_rate = Scalar(1e-3);
  Scalar beta1 = Scalar(0.9);
  Scalar beta2 = Scalar(0.999);
  Scalar eps = Scalar(1e-8);
  Scalar weight_decay = 0;
};

/// Adam (Kingma & Ba 2015) as PyTorch's torch.optim.Adam computes it (bias correction, L2 weight
/// decay added to the gradient, no AMSGrad), then policy.project() if the policy has one:
///   g += weight_decay * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
///   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      (PyTorch's order)
/// Throws std::invalid_argument for hyper-parameters PyTorch rejects.
template <std::floating_point Scalar>
class adam {
 public:
  explicit adam(Scalar learning_rate = Scalar(1e-3), Scalar beta1 = Scalar(0.9), Scalar beta2 = Scalar(0.999),
                Scalar eps = Scalar(1e-8), Scalar weight_decay = 0)
      : adam(adam_options<Scalar>{learning_rate, beta1, beta2, eps, weight_decay}) {}
  explicit adam(adam_options<Scalar> options) : options_(options) {
    constexpr const char* where = "relbias::adam";
    const adam_options<Scalar>& o = options;
    detail::check_hyper(where, "learning_rate", o.learning_rate, o.learning_rate >= 0, ">= 0");
    detail::check_hyper(where, "beta1", o.beta1, o.beta1 >= 0 && o.beta1 < 1, "in [0, 1)");
    detail::check_hyper(where, "beta2", o.beta2, o.beta2 >= 0 && o.beta2 < 1, "in [0, 1)");
    detail::check_hyper(where, "eps", o.eps, o.eps >= 0, ">= 0");
    detail::check_hyper(where, "weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0");
  }

  /// grad is laid out like policy.parameters(); a size mismatch throws std::invalid_argument
  /// before anything changes.
  template <learned_bias Policy>
  void step(Policy& policy, std::span<const Scalar> grad) {
    static_assert(std::same_as<typename Policy::scalar_type, Scalar>,
                  "relbias::adam: use adam<typename Policy::scalar_type>, the policy's own scalar type");
    constexpr const char* where = "relbias::adam::step";
    detail::check_gradient_size(where, policy, grad.size());
    auto p = policy.parameters();
    detail::check_state_size(where, first_.size(), p.size());
    if (first_.size() == 0) {
      first_ = param_vector<Scalar>::Zero(p.size());
      second_ = param_vector<Scalar>::Zero(p.size());
    }
    const adam_options<Scalar>& o = options_;
    ++steps_;
    const Scalar step_size = o.learning_rate / (1 - std::pow(o.beta1, Scalar(steps_)));
    const Scalar second_correction_sqrt = std::sqrt(1 - std::pow(o.beta2, Scalar(steps_)));
    for (index_t n = 0; n < p.size(); ++n) {  // a plain loop, as in sgd::step
      const Scalar g = grad[std::size_t(n)] + o.weight_decay * p[n];
      first_[n] = o.beta1 * first_[n] + (1 - o.beta1) * g;
      second_[n] = o.beta2 * second_[n] + (1 - o.beta2) * g * g;
      p[n] -= step_size * first_[n] / (std::sqrt(second_[n]) / second_correction_sqrt + o.eps);
    }
    detail::project_if_constrained(policy);
  }

  /// Steps taken so far (t in the bias corrections).
  std::int64_t steps() const noexcept { return steps_; }
  const adam_options<Scalar>& options() const noexcept { return options_; }
  /// For a schedule (warm-up, decay): the next step uses this rate; the moments are kept, as when
  /// PyTorch's schedulers write param_group["lr"]. Throws std::invalid_argument unless >= 0.
  void set_learning_rate(Scalar learning_rate) {
    detail::check_hyper("relbias::adam::set_learning_rate", "learning_rate", learning_rate, learning_rate >= 0, ">= 0");
    options_.learning_rate = learning_rate;
  }

 private:
  adam_options<Scalar> options_;
  param_vector<Scalar> first_, second_;  // (P) each, sized on the first step
  std::int64_t steps_ = 0;
};

// Parameter files: "RELBIAS1" | format version (u32) | scalar size (u32) | count (u64) |
// FNV-1a 64 of the payload (u64) | [version 2: configuration size (u32) | configuration text] |
// payload (count scalars, native byte order).
// Version 2 added the configuration: the policy's configuration() text ("t5(heads 4, buckets
// 32, max_distance 128, causal)"), empty for a policy without one. Version 1 files (no
// configuration) still load, checked by count and scalar size only.
namespace detail {

inline constexpr char parameter_magic[8] = {'R', 'E', 'L', 'B', 'I', 'A', 'S', '1'};
inline constexpr std::uint32_t parameter_format_version = 2;
inline constexpr std::uint32_t max_configuration_size = 4096;  // a damaged size field reads no further

/// The policy's own description of its kind and shape, or "" if it has none (a user policy
/// without configuration(): its files are checked by parameter count and scalar size alone).
template <class Policy>
std::string configuration_of(const Policy& policy) {
  if constexpr (requires { { policy.configuration() } -> std::convertible_to<std::string>; }) return policy.configuration();
  else return {};
}

struct parameter_header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t scalar_size;
  std::uint64_t count;
  std::uint64_t checksum;
};
static_assert(sizeof(parameter_header) == 32, "the file header is 32 bytes without padding");

inline std::uint64_t fnv1a64(const void* data, std::size_t size) {
  std::uint64_t hash = 0xcbf29ce484222325ull;
  for (std::size_t n = 0; n < size; ++n) hash = (hash ^ static_cast<const unsigned char*>(data)[n]) * 0x100000001b3ull;
  return hash;
}

[[noreturn]] inline void damaged(const std::filesystem::path& path, const std::string& what) {
  throw std::runtime_error("relbias::load_parameters: " + path.string() + ": " + what);
}

}  // namespace detail

namespace detail {

#if defined(__unix__) || defined(__APPLE__)
/// Writes bytes to a new file beside path, created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW: a
/// file or symlink planted under the temporary name is never opened, let alone followed), then
/// renames it over path (rename replaces a symlink at path itself, never its target). Returns
/// false if any step fails, leaving no temporary file behind.
inline bool replace_file(const std::filesystem::path& path, const std::vector<char>& bytes) {
  static std::atomic<unsigned> counter{0};
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::filesystem::path partial = path;
    partial += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
    const int fd = ::open(partial.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0) {
      if (errno == EEXIST) continue;  // taken (or planted): try another name
      return false;
    }
    std::size_t written = 0;
    while (written < bytes.size()) {
      const ::ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      written += std::size_t(n);
    }
    const bool closed = ::close(fd) == 0;
    if (written == bytes.size() && closed && std::rename(partial.c_str(), path.c_str()) == 0) return true;
    ::unlink(partial.c_str());
    return false;
  }
  return false;
}
#else
/// Without POSIX: the bytes go to path + ".tmp", then are renamed over path.
inline bool replace_file(const std::filesystem::path& path, const std::vector<char>& bytes) {
  std::filesystem::path partial = path;
  partial += ".tmp";
  std::ofstream out(partial, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  std::error_code error;
  if (out) std::filesystem::rename(partial, path, error);
  if (!out || error) std::filesystem::remove(partial, error);
  return out && !error;
}
#endif

}  // namespace detail

/// Writes every parameter of the policy to path, replacing any file there, with the policy's
/// configuration() (its kind and shape: heads, buckets, max_distance, mode, clip, width, ...)
/// if it has that member; every built-in policy has, a user policy may add one (a short string,
/// equal exactly when two policies lay out their parameters alike). The bytes go to a new
/// temporary file in path's directory, created exclusively and without following symlinks, and
/// are renamed over path only when complete: an interrupted save never leaves a half-written
/// checkpoint, and a symlink planted under the temporary name is never written through. Throws
/// std::runtime_error naming the path if it cannot.
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
  const std::string configuration = detail::configuration_of(policy);
  if (configuration.size() > detail::max_configuration_size)
    throw std::invalid_argument("relbias::save_parameters: the policy's configuration() exceeds " +
                                std::to_string(detail::max_configuration_size) + " characters");
  const auto configuration_size = std::uint32_t(configuration.size());

  std::vector<char> file(sizeof header + sizeof configuration_size + configuration.size() + bytes);
  char* at = file.data();
  std::memcpy(at, &header, sizeof header);
  std::memcpy(at += sizeof header, &configuration_size, sizeof configuration_size);
  std::memcpy(at += sizeof configuration_size, configuration.data(), configuration.size());
  if (bytes > 0) std::memcpy(at + configuration.size(), p.data(), bytes);
  if (!detail::replace_file(path, file)) throw std::runtime_error("relbias::save_parameters: cannot write " + path.string());
}

/// Reads parameters written by save_parameters into the policy. A file written for another
/// policy or shape (its recorded configuration differs from the policy's configuration(): "file
/// holds t5(heads 4, ...); the policy is t5(heads 2, ...)"), for another parameter count or
/// scalar type, or with values the policy's validate() rejects (NaN, a KERPLE r2 outside its
/// range), throws std::invalid_argument. Configurations are compared only when both the file
/// and the policy have one (a version 1 file, or a policy without configuration(), is checked
/// by count and scalar size). An unreadable, truncated or damaged file throws
/// std::runtime_error naming the path. Either way the policy is left unchanged.
template <learned_bias Policy>
void load_parameters(Policy& policy, const std::filesystem::path& path) {
  using S = typename Policy::scalar_type;
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::damaged(path, "cannot open");
  detail::parameter_header header{};
  if (!in.read(reinterpret_cast<char*>(&header), sizeof header)) detail::damaged(path, "truncated header");
  if (std::memcmp(header.magic, detail::parameter_magic, sizeof header.magic) != 0)
    detail::damaged(path, "not a relbias parameter file (bad magic)");
  if (header.version != 1 && header.version != detail::parameter_format_version)
    detail::damaged(path, "format version " + std::to_string(header.version) + ", expected 1 to " +
                              std::to_string(detail::parameter_format_version));
  std::string recorded;
  if (header.version >= 2) {
    std::uint32_t size = 0;
    if (!in.read(reinterpret_cast<char*>(&size), sizeof size) || size > detail::max_configuration_size)
      detail::damaged(path, "truncated or damaged configuration");
    recorded.resize(size);
    if (!in.read(recorded.data(), std::streamsize(size))) detail::damaged(path, "truncated configuration");
  }
  const std::string configuration = detail::configuration_of(policy);
  if (!recorded.empty() && !configuration.empty() && recorded != configuration)
    throw std::invalid_argument("relbias::load_parameters: " + path.string() + ": file holds " + recorded + "; the policy is " +
                                configuration);
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
    detail::damaged(path, "checksum mismatch: the payload does not match the FNV-1a checksum in the header");
  const param_vector<S> previous = policy.parameters();
  policy.parameters() = Eigen::Map<const param_vector<S>>(values.data(), index_t(values.size()));
  if constexpr (requires { policy.validate(); }) {
    try {
      policy.validate();
    } catch (const std::invalid_argument& error) {
      policy.parameters() = previous;
      throw std::invalid_argument("relbias::load_parameters: " + path.string() + ": " + error.what());
    }
  }
}

}  // namespace relbias
