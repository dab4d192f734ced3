#pragma once
// Validation at the public entry points: std::invalid_argument naming the argument and the
// values seen (tier 2 of the error model).

#include "relbias/attention_options.hpp"
#include "relbias/tensor.hpp"

#include <span>
#include <stdexcept>
#include <string>

namespace relbias::detail {

inline std::string shape_string(index_t b, index_t s, index_t h, index_t d) {
  std::string text("[");  // appended piece by piece: GCC 12 misreports "literal" + string (bug 105329)
  for (const index_t extent : {b, s, h, d}) text.append(std::to_string(extent)).append(", ");
  text.resize(text.size() - 2);
  return text.append("]");
}

template <class T>
std::string shape_string(const tensor_view<T>& t) {
  return shape_string(t.batch, t.seq, t.heads, t.dim);
}

[[noreturn]] inline void fail(const char* where, const std::string& what) {
  throw std::invalid_argument(std::string(where) + ": " + what);
}

template <class T>
void check_tensor(const char* where, const char* name, const tensor_view<T>& t) {
  if (t.data == nullptr) fail(where, std::string(name) + " has no data (null pointer)");
  if (t.batch < 1 || t.seq < 1 || t.heads < 1 || t.dim < 1)
    fail(where, std::string(name) + " [batch, seq, heads, dim] must all be >= 1, got " + shape_string(t));
}

template <class T>
void check_shape(const char* where, const char* name, const tensor_view<T>& t, index_t b, index_t s, index_t h, index_t d) {
  check_tensor(where, name, t);
  if (t.batch != b || t.seq != s || t.heads != h || t.dim != d)
    fail(where, std::string(name) + " must have shape [batch, seq, heads, dim] = " + shape_string(b, s, h, d) +
                    ", got " + shape_string(t));
}

/// q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] with Hk dividing Hq; a bias with Hq
/// heads; a finite scale.
template <class S>
void check_qkv(const char* where, const tensor_view<const S>& q, const tensor_view<const S>& k,
               const tensor_view<const S>& v, index_t bias_heads, const attention_options<S>& options) {
  check_tensor(where, "q", q);
  check_tensor(where, "k", k);
  check_shape(where, "k", k, q.batch, k.seq, k.heads, q.dim);
  check_shape(where, "v", v, q.batch, k.seq, k.heads, v.dim);
  if (q.heads % k.heads != 0)
    fail(where, "q.heads (" + std::to_string(q.heads) + ") must be a multiple of k.heads (" + std::to_string(k.heads) +
                    ") for grouped-query attention");
  if (bias_heads != q.heads)
    fail(where, "bias.num_heads() (" + std::to_string(bias_heads) + ") must equal q.heads (" + std::to_string(q.heads) + ")");
  if (options.scale && !std::isfinite(*options.scale))
    fail(where, "options.scale must be finite, got " + std::to_string(*options.scale));
  if (options.num_threads < 0) fail(where, "options.num_threads must be >= 0, got " + std::to_string(options.num_threads));
}

/// o [B, Lq, Hq, Dv] and lse of B * Hq * Lq entries (or empty when the caller needs none).
template <class S>
void check_outputs(const char* where, const tensor_view<const S>& q, const tensor_view<const S>& v,
                   const tensor_view<S>& o, std::span<S> lse, bool lse_required) {
  check_shape(where, "o", o, q.batch, q.seq, q.heads, v.dim);
  const index_t expected = q.batch * q.heads * q.seq;
  if ((lse_required || !lse.empty()) && index_t(lse.size()) != expected)
    fail(where, "lse must hold batch * heads * Lq = " + std::to_string(expected) + " values, got " +
                    std::to_string(lse.size()));
}

}  // namespace relbias::detail

namespace relbias::detail {

/// The backward pass's extra tensors: o and d_out [B, Lq, Hq, Dv], lse of B * Hq * Lq values,
/// dq/dk/dv shaped like q/k/v, and bias_grad either empty or of the policy's parameter count.
template <class S>
void check_backward(const char* where, const tensor_view<const S>& q, const tensor_view<const S>& k,
                    const tensor_view<const S>& v, const tensor_view<const S>& o, const tensor_view<const S>& d_out,
                    std::span<const S> lse, const tensor_view<S>& dq, const tensor_view<S>& dk,
                    const tensor_view<S>& dv, std::size_t bias_grad_size, std::size_t parameter_count) {
  check_shape(where, "o", o, q.batch, q.seq, q.heads, v.dim);
  check_shape(where, "d_out", d_out, q.batch, q.seq, q.heads, v.dim);
  check_shape(where, "dq", dq, q.batch, q.seq, q.heads, q.dim);
  check_shape(where, "dk", dk, k.batch, k.seq, k.heads, k.dim);
  check_shape(where, "dv", dv, v.batch, v.seq, v.heads, v.dim);
  const std::size_t expected = std::size_t(q.batch * q.heads * q.seq);
  if (lse.size() != expected)
    fail(where, "lse must hold batch * heads * Lq = " + std::to_string(expected) + " values, got " + std::to_string(lse.size()));
  if (bias_grad_size != 0 && bias_grad_size != parameter_count)
    fail(where, "bias_grad must be empty or hold the policy's " + std::to_string(parameter_count) +
                    " parameters, got " + std::to_string(bias_grad_size));
}

}  // namespace relbias::detail
