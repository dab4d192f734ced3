#pragma once
// Validation at the public entry points: std::invalid_argument naming the argument and the
// values seen (tier 2 of the error model).

#include "relbias/attention_options.hpp"
#include "relbias/concepts.hpp"
#include "relbias/offset.hpp"
#include "relbias/tensor.hpp"

#include <algorithm>
#include <array>
#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

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

/// The message of the first std::invalid_argument `checks` throws, or "" when it throws none: a
/// collective caller (the ring) shares it with the other ranks before anyone throws.
template <class Checks>
std::string first_violation(Checks&& checks) {
  try {
    checks();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return {};
}

/// a * b, or a clear error naming what the product is of when it does not fit in an index.
inline index_t checked_product(const char* where, const std::string& what, std::initializer_list<index_t> factors) {
  index_t product = 1;
  bool overflow = false;
  std::string text;
  for (const index_t f : factors) {
    overflow = overflow || f < 0 || __builtin_mul_overflow(product, f, &product);
    text.append(text.empty() ? "" : " * ").append(std::to_string(f));
  }
  if (overflow) fail(where, what + " = " + text + " overflows the index type");
  return product;
}

/// Bytes from a view's first element to the furthest one along its strided axes, so that every
/// address the kernels form (b * batch_stride + s * seq_stride + h * head_stride + d) is
/// computable without overflow.
template <class T>
bool address_span_fits(const tensor_view<T>& t) {
  index_t total = t.dim;
  for (const auto& [extent, stride] : {std::pair{t.batch, t.batch_stride}, {t.seq, t.seq_stride}, {t.heads, t.head_stride}}) {
    index_t part = 0;
    if (stride == std::numeric_limits<index_t>::min() || __builtin_mul_overflow(extent - 1, stride < 0 ? -stride : stride, &part) ||
        __builtin_add_overflow(total, part, &total))
      return false;
  }
  return total <= max_elements<T>();
}

template <class T>
void check_tensor(const char* where, const char* name, const tensor_view<T>& t) {
  if (t.data == nullptr) fail(where, std::string(name) + " has no data (null pointer)");
  if (t.batch < 1 || t.seq < 1 || t.heads < 1 || t.dim < 1)
    fail(where, std::string(name) + " [batch, seq, heads, dim] must all be >= 1, got " + shape_string(t));
  if (!address_span_fits(t))
    fail(where, std::string(name) + " of shape " + shape_string(t) + " with strides [" + std::to_string(t.batch_stride) +
                    ", " + std::to_string(t.seq_stride) + ", " + std::to_string(t.head_stride) +
                    "] spans more elements than an index addresses");
}

/// A span the kernels write or read: empty, or with data.
template <class T>
void check_span(const char* where, const char* name, std::span<T> values) {
  if (!values.empty() && values.data() == nullptr)
    fail(where, std::string(name) + " has " + std::to_string(values.size()) + " values but no data (null pointer)");
}

template <class T>
void check_shape(const char* where, const char* name, const tensor_view<T>& t, index_t b, index_t s, index_t h, index_t d) {
  check_tensor(where, name, t);
  if (t.batch != b || t.seq != s || t.heads != h || t.dim != d)
    fail(where, std::string(name) + " must have shape [batch, seq, heads, dim] = " + shape_string(b, s, h, d) +
                    ", got " + shape_string(t));
}

/// The largest absolute position: q_start + Lq and k_start + Lk must not exceed it, so that
/// every offset i - j, its negation and twice a distance fit in an index.
inline constexpr index_t max_position = index_t(1) << 62;

/// Positions [q_start, q_start + Lq) and [k_start, k_start + Lk) within [0, 2^62].
template <class S>
void check_positions(const char* where, const attention_options<S>& options, index_t query_length, index_t key_length) {
  const auto check = [&](const char* start_name, index_t start, const char* length_name, index_t length) {
    if (start < 0 || start > max_position - length)
      fail(where, std::string("options.") + start_name + " must be in [0, 2^62 - " + length_name + "], got " + start_name +
                      "=" + std::to_string(start) + ", " + length_name + "=" + std::to_string(length));
  };
  check("q_start", options.q_start, "Lq", query_length);
  check("k_start", options.k_start, "Lk", key_length);
}

/// q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv] (paged: k and v [num_blocks,
/// block_size, Hk, D / Dv]) with Hk dividing Hq; a bias with Hq
/// heads; a finite scale; positions within [0, 2^62].
template <class Q, class K, class V, class S>
void check_qkv(const char* where, const tensor_view<const Q>& q, const tensor_view<const K>& k,
               const tensor_view<const V>& v, index_t bias_heads, const attention_options<S>& options) {
  check_tensor(where, "q", q);
  check_tensor(where, "k", k);
  const index_t kv_batch = options.paged ? k.batch : q.batch;  // a paged cache: k and v are pools of blocks
  check_shape(where, "k", k, kv_batch, k.seq, k.heads, q.dim);
  check_shape(where, "v", v, kv_batch, k.seq, k.heads, v.dim);
  if (q.heads % k.heads != 0)
    fail(where, "q.heads (" + std::to_string(q.heads) + ") must be a multiple of k.heads (" + std::to_string(k.heads) +
                    ") for grouped-query attention");
  if (bias_heads != q.heads)
    fail(where, "bias.num_heads() (" + std::to_string(bias_heads) + ") must equal q.heads (" + std::to_string(q.heads) + ")");
  if (options.scale && !std::isfinite(*options.scale))
    fail(where, "options.scale must be finite, got " + std::to_string(*options.scale));
  if (options.num_threads < 0) fail(where, "options.num_threads must be >= 0, got " + std::to_string(options.num_threads));
  check_positions(where, options, q.seq, k.seq);
}

/// A policy built for one masking mode (t5, per_offset: their buckets or table differ) must be
/// used with that mode: causal buckets under bidirectional attention would give every future key
/// the bucket of distance 0. The policy's mode() is the one source of truth; options.mask must agree.
template <class Bias, class S>
void check_bias_mode(const char* where, const Bias& bias, const attention_options<S>& options) {
  if constexpr (requires { { bias.mode() } -> std::convertible_to<masking>; })
    if (masking(bias.mode()) != options.mask)
      fail(where, std::string("the bias policy was built for ") + masking_name(bias.mode()) + " attention but options.mask is " +
                      masking_name(options.mask) + " (use the same masking for both)");
}

/// o [B, Lq, Hq, Dv] and lse of B * Hq * Lq entries (or empty when the caller needs none).
template <class Q, class V, class S>
void check_outputs(const char* where, const tensor_view<const Q>& q, const tensor_view<const V>& v,
                   const tensor_view<S>& o, std::span<S> lse, bool lse_required) {
  check_shape(where, "o", o, q.batch, q.seq, q.heads, v.dim);
  check_span(where, "lse", lse);
  const index_t expected = checked_product(where, "lse size batch * heads * Lq", {q.batch, q.heads, q.seq});
  if ((lse_required || !lse.empty()) && index_t(lse.size()) != expected)
    fail(where, "lse must hold batch * heads * Lq = " + std::to_string(expected) + " values, got " +
                    std::to_string(lse.size()));
}

}  // namespace relbias::detail

namespace relbias::detail {

/// The largest |lse| the backward accepts: 2^16 (float), 2^45 (double). Beyond it lse's own
/// rounding (ulp >= 2^-8) makes exp(score - lse) lose more than 8 bits (at 2^53 a double lse
/// cannot tell eight tied keys from one, and P would sum to 8): scores of that size are beyond
/// the precision of the scalar type, so the backward says so instead of returning wrong gradients.
template <class S>
constexpr S lse_limit() noexcept {
  return S(index_t(1) << (std::numeric_limits<S>::digits - 8));
}

template <class S>
void check_lse_precision(const char* where, std::span<const S> lse) {
  for (std::size_t n = 0; n < lse.size(); ++n)
    if (std::isfinite(lse[n]) && std::abs(lse[n]) >= lse_limit<S>())
      fail(where, "lse[" + std::to_string(n) + "] = " + std::to_string(double(lse[n])) + ": |lse| >= " +
                      std::to_string(double(lse_limit<S>())) +
                      " leaves exp(score - lse) fewer than 8 correct bits (scores + bias beyond the scalar type's precision; "
                      "use double, or keep a near key visible)");
}

/// The backward pass's extra tensors: o and d_out [B, Lq, Hq, Dv], lse of B * Hq * Lq values,
/// dq/dk/dv shaped like q/k/v, and bias_grad either empty or of the policy's parameter count.
/// (q, k, v, o and d_out may be 16-bit storage: the bf16 backward's check, attention_half.hpp.)
template <class S, class Q = S, class KV = S, class O = S, class DO = S>
void check_backward(const char* where, const tensor_view<const Q>& q, const tensor_view<const KV>& k,
                    const tensor_view<const KV>& v, const tensor_view<const O>& o, const tensor_view<const DO>& d_out,
                    std::span<const S> lse, const tensor_view<S>& dq, const tensor_view<S>& dk,
                    const tensor_view<S>& dv, std::span<S> bias_grad, std::size_t parameter_count) {
  const std::size_t bias_grad_size = bias_grad.size();
  check_span(where, "bias_grad", bias_grad);
  check_shape(where, "o", o, q.batch, q.seq, q.heads, v.dim);
  check_shape(where, "d_out", d_out, q.batch, q.seq, q.heads, v.dim);
  check_shape(where, "dq", dq, q.batch, q.seq, q.heads, q.dim);
  check_shape(where, "dk", dk, k.batch, k.seq, k.heads, k.dim);
  check_shape(where, "dv", dv, v.batch, v.seq, v.heads, v.dim);
  check_span(where, "lse", lse);
  const auto expected = std::size_t(checked_product(where, "lse size batch * heads * Lq", {q.batch, q.heads, q.seq}));
  if (lse.size() != expected)
    fail(where, "lse must hold batch * heads * Lq = " + std::to_string(expected) + " values, got " + std::to_string(lse.size()));
  check_lse_precision(where, lse);
  if (bias_grad_size != 0 && bias_grad_size != parameter_count)
    fail(where, "bias_grad must be empty or hold the policy's " + std::to_string(parameter_count) +
                    " parameters, got " + std::to_string(bias_grad_size));
}


// ---- Aliasing: outputs must not share memory with inputs or with each other, and must not
// overlap themselves (a zero stride would make threads race on one row). Overlap is decided
// per element row, so packed layouts (q, k, v interleaved in one buffer; dq, dk, dv likewise)
// stay legal.

/// The memory of a view or span: rows of row_bytes contiguous bytes starting at
/// base + sum of n_a * stride_a (bytes) for n_a < extent_a.
struct memory_block {
  const char* name;
  std::uintptr_t base;
  index_t row_bytes;
  std::array<index_t, 3> extent, stride;

  std::uintptr_t lowest() const {
    std::uintptr_t lo = base;
    for (std::size_t a = 0; a < 3; ++a)
      if (stride[a] < 0) lo -= std::uintptr_t(-stride[a]) * std::uintptr_t(extent[a] - 1);
    return lo;
  }
  std::uintptr_t end() const {  // one past the last byte
    std::uintptr_t hi = base + std::uintptr_t(row_bytes);
    for (std::size_t a = 0; a < 3; ++a)
      if (stride[a] > 0) hi += std::uintptr_t(stride[a]) * std::uintptr_t(extent[a] - 1);
    return hi;
  }
  /// Sorted start addresses of the distinct rows (a zero-stride axis repeats the same rows).
  std::vector<std::uintptr_t> row_starts() const {
    std::array<index_t, 3> n = extent;
    for (std::size_t a = 0; a < 3; ++a)
      if (stride[a] == 0) n[a] = 1;
    std::vector<std::uintptr_t> starts;
    starts.reserve(std::size_t(n[0] * n[1] * n[2]));
    for (index_t x = 0; x < n[0]; ++x)
      for (index_t y = 0; y < n[1]; ++y)
        for (index_t z = 0; z < n[2]; ++z)
          starts.push_back(base + std::uintptr_t(x * stride[0] + y * stride[1] + z * stride[2]));
    std::sort(starts.begin(), starts.end());
    return starts;
  }
};

template <class T>
memory_block block_of(const char* name, const tensor_view<T>& t) {
  constexpr auto size = index_t(sizeof(T));
  return {name, reinterpret_cast<std::uintptr_t>(t.data), t.dim * size,
          {t.batch, t.seq, t.heads}, {t.batch_stride * size, t.seq_stride * size, t.head_stride * size}};
}

template <class T>
memory_block block_of(const char* name, std::span<T> values) {
  return {name, reinterpret_cast<std::uintptr_t>(values.data()), index_t(values.size() * sizeof(T)), {1, 1, 1}, {0, 0, 0}};
}

/// Whether two rows of the block can share a byte. Layouts whose axes nest (sorted by stride,
/// each stride at least the span of the rows inside it: every bshd/bhsd view) are decided at
/// once; any other layout by its sorted rows.
inline bool overlaps_itself(const memory_block& m) {
  std::array<std::pair<index_t, index_t>, 3> axes{};  // (|stride|, extent) of the axes with extent > 1
  std::size_t count = 0;
  for (std::size_t a = 0; a < 3; ++a)
    if (m.extent[a] > 1) {
      if (m.stride[a] == 0) return true;
      axes[count++] = {m.stride[a] < 0 ? -m.stride[a] : m.stride[a], m.extent[a]};
    }
  // Insertion sort of at most three axes: std::sort here trips GCC 12's -Warray-bounds at -O2
  // (its unrolled insertion step for 16 elements), a false positive in users' -Werror builds.
  for (std::size_t a = 1; a < count; ++a)
    for (std::size_t b = a; b > 0 && axes[b] < axes[b - 1]; --b) std::swap(axes[b], axes[b - 1]);
  index_t span = m.row_bytes;
  bool nested = true;
  for (std::size_t a = 0; a < count && nested; ++a) {
    nested = axes[a].first >= span;
    span = axes[a].first * (axes[a].second - 1) + span;
  }
  if (nested) return false;
  const std::vector<std::uintptr_t> starts = m.row_starts();
  for (std::size_t n = 1; n < starts.size(); ++n)
    if (starts[n] - starts[n - 1] < std::uintptr_t(m.row_bytes)) return true;
  return false;
}

/// Whether some sum of k_x * axis[x].first with |k_x| < axis[x].second (x >= first; axes by
/// decreasing stride, strides > 0) lies in (lo, hi), or nullopt when an axis offers more than a
/// few candidates (the caller then lists rows). Nested axes (each stride at least the span of
/// the rows inside it, as in every bshd/bhsd view) leave at most three candidates per axis.
inline std::optional<bool> lattice_reaches(const std::array<std::pair<index_t, index_t>, 3>& axes, std::size_t count,
                                           std::size_t first, std::intmax_t lo, std::intmax_t hi) {
  if (first == count) return lo < 0 && 0 < hi;
  std::intmax_t inner = 0;  // the inner axes reach [-inner, inner]
  for (std::size_t x = first + 1; x < count; ++x) inner += std::intmax_t(axes[x].first) * (axes[x].second - 1);
  const auto stride = std::intmax_t(axes[first].first), most = std::intmax_t(axes[first].second - 1);
  auto floor_div = [](std::intmax_t n, std::intmax_t d) { return n / d - (n % d != 0 && n < 0); };
  const std::intmax_t k_lo = std::max(-most, floor_div(lo - inner, stride)), k_hi = std::min(most, floor_div(hi + inner, stride) + 1);
  if (k_hi - k_lo > 4) return std::nullopt;
  for (std::intmax_t k = k_lo; k <= k_hi; ++k) {
    const std::optional<bool> reached = lattice_reaches(axes, count, first + 1, lo - k * stride, hi - k * stride);
    if (!reached || *reached) return reached;
  }
  return false;
}

/// Rows of two blocks of one layout (same extents and strides: q, k and v interleaved in one
/// buffer, or dq, dk and dv) overlap when b's rows, a's shifted by delta = b.base - a.base, meet
/// a's: when a difference of two row offsets lies in (delta - a.row_bytes, delta + b.row_bytes).
/// Decided from the strides, without listing and sorting every row; nullopt for other layouts.
inline std::optional<bool> same_layout_overlap(const memory_block& a, const memory_block& b) {
  if (a.extent != b.extent || a.stride != b.stride) return std::nullopt;
  std::array<std::pair<index_t, index_t>, 3> axes{};  // (|stride| in bytes, extent), zero strides dropped
  std::size_t count = 0;
  for (std::size_t x = 0; x < 3; ++x)
    if (a.extent[x] > 1 && a.stride[x] != 0) axes[count++] = {a.stride[x] < 0 ? -a.stride[x] : a.stride[x], a.extent[x]};
  for (std::size_t x = 1; x < count; ++x)  // by decreasing stride (insertion sort: see overlaps_itself)
    for (std::size_t y = x; y > 0 && axes[y - 1].first < axes[y].first; --y) std::swap(axes[y], axes[y - 1]);
  const auto delta = std::intmax_t(b.base - a.base);  // two's complement: negative when b starts lower
  return lattice_reaches(axes, count, 0, delta - std::intmax_t(a.row_bytes), delta + std::intmax_t(b.row_bytes));
}

/// Whether a row of `a` shares a byte with a row of `b`; `a` must not overlap itself.
inline bool overlap(const memory_block& a, const memory_block& b) {
  if (a.row_bytes == 0 || b.row_bytes == 0 || a.end() <= b.lowest() || b.end() <= a.lowest()) return false;
  if (const std::optional<bool> decided = same_layout_overlap(a, b)) return *decided;
  const std::vector<std::uintptr_t> rows_a = a.row_starts();
  for (const std::uintptr_t start : b.row_starts()) {
    // The row of a starting last before b's row ends is the only one that can reach into it.
    const auto after = std::lower_bound(rows_a.begin(), rows_a.end(), start + std::uintptr_t(b.row_bytes));
    if (after != rows_a.begin() && *std::prev(after) + std::uintptr_t(a.row_bytes) > start) return true;
  }
  return false;
}

/// Every output against itself, the other outputs and every input.
inline void check_no_aliasing(const char* where, std::initializer_list<memory_block> outputs,
                              std::initializer_list<memory_block> inputs) {
  for (const memory_block& out : outputs)
    if (out.row_bytes > 0 && overlaps_itself(out))
      fail(where, std::string(out.name) + " overlaps itself (a zero or too small stride): outputs need one row of memory each");
  for (auto a = outputs.begin(); a != outputs.end(); ++a) {
    for (auto b = std::next(a); b != outputs.end(); ++b)
      if (overlap(*a, *b)) fail(where, std::string(a->name) + " and " + b->name + " overlap in memory: outputs must not share memory");
    for (const memory_block& in : inputs)
      if (overlap(*a, in))
        fail(where, std::string(a->name) + " overlaps the input " + in.name +
                        " in memory: outputs must not share memory with inputs (the kernels read inputs after writing outputs)");
  }
}

/// A learned policy's parameters, which the kernels read while they write bias_grad.
template <class Bias>
memory_block parameter_block(const Bias& bias) {
  if constexpr (learned_bias<Bias>) {
    const auto p = bias.parameters();
    return block_of("bias.parameters()", std::span<const typename Bias::scalar_type>(p.data(), std::size_t(p.size())));
  } else {
    return {"bias.parameters()", 0, 0, {1, 1, 1}, {0, 0, 0}};
  }
}

/// The owning overloads allocate O [B, Lq, H, Dv] and lse [B][H][Lq]: both sizes must fit
/// before anything is allocated (views with zero strides can describe more than memory holds).
template <class Q, class V, class Out = V>  // Out: the element type of o
void check_result_sizes(const char* where, const tensor_view<const Q>& q, const tensor_view<const V>& v) {
  const index_t o_size = checked_product(where, "o size batch * Lq * heads * dim_v", {q.batch, q.seq, q.heads, v.dim});
  if (o_size > max_elements<Out>())
    fail(where, "o size batch * Lq * heads * dim_v = " + std::to_string(o_size) + " exceeds what one allocation can hold");
}

}  // namespace relbias::detail
