#pragma once
// The Python binding's C++ half: tensors arrive as raw pointers with shapes and element strides
// (torch.Tensor.data_ptr() and .stride(), read on the Python side), the bias policy as its kind,
// configuration and flat parameter values. Nothing here links against libtorch: the module needs
// only pybind11 and relbias's headers, and the tensors are never copied.

#include <relbias/relbias.hpp>

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace relbias_python {

using relbias::index_t;

/// A tensor as the Python side describes it: data pointer, [batch, seq, heads, dim] and the
/// element strides of batch, seq and heads (its last axis is contiguous: Python checks that).
using tensor_desc = std::array<std::int64_t, 8>;

/// A flat buffer: data pointer and element count (count 0: none).
using span_desc = std::array<std::int64_t, 2>;

template <class T>
relbias::tensor_view<T> view_of(const tensor_desc& d) {
  return {reinterpret_cast<T*>(static_cast<std::uintptr_t>(d[0])), d[1], d[2], d[3], d[4], d[5], d[6], d[7]};
}

template <class T>
std::span<T> span_of(const span_desc& d) {
  return {reinterpret_cast<T*>(static_cast<std::uintptr_t>(d[0])), static_cast<std::size_t>(d[1])};
}

/// A bias module's description (relbias/bias.py builds it): which policy, its configuration, and
/// its parameters in the policy's parameters() layout, in the attention's scalar type.
struct bias_spec {
  std::string kind;              // none, alibi, t5, per_offset, kerple_power, kerple_log, fire, sandwich
  index_t heads = 1;
  bool causal = false;           // t5 and per_offset: the policy's mode
  index_t num_buckets = 32, max_distance = 128;  // t5
  index_t clip = 0;              // per_offset
  index_t dim = 0;               // sandwich
  index_t width = 32;            // fire
  double init_L = 512, eps = 1e-6;  // fire
  span_desc params{0, 0};
};

/// Everything attention() takes besides tensors and bias (relbias/_attention.py fills it).
struct call_options {
  bool causal = false;
  std::optional<index_t> window;
  std::optional<double> scale;
  index_t q_start = 0, k_start = 0;
  std::vector<index_t> cu_seqlens_q, cu_seqlens_k;  // packed batch (k empty: self-attention, q's rows)
  std::optional<std::vector<index_t>> seq_lengths;  // padded batch (right padding)
  int num_threads = 0;

  template <class S>
  relbias::attention_options<S> to(index_t padded_length) const {
    relbias::attention_options<S> o;
    o.mask = causal ? relbias::masking::causal : relbias::masking::bidirectional;
    o.sliding_window = window;
    o.q_start = q_start;
    o.k_start = k_start;
    if (scale) o.scale = S(*scale);
    o.num_threads = num_threads;
    if (!cu_seqlens_q.empty())  // errors name cu_seqlens (self-attention) or cu_seqlens_q / cu_seqlens_k
      o.sequences = cu_seqlens_k.empty() ? relbias::packed_sequences(cu_seqlens_q) : relbias::packed_sequences(cu_seqlens_q, cu_seqlens_k);
    if (seq_lengths) o.sequences = relbias::padded_sequences(*seq_lengths, padded_length);
    return o;
  }
};

/// Builds the policy `spec` describes, with scalar S, and calls f(policy). Throws
/// std::invalid_argument (ValueError in Python) for an unknown kind or values the policy rejects.
template <class S, class F>
void with_policy(const bias_spec& spec, F&& f) {
  const std::span<const S> values = span_of<const S>(spec.params);
  const auto mode = spec.causal ? relbias::masking::causal : relbias::masking::bidirectional;
  const std::size_t heads = std::size_t(spec.heads);
  auto require = [&](std::size_t count) {
    if (values.size() != count)
      throw std::invalid_argument("relbias: the " + spec.kind + " bias expects " + std::to_string(count) +
                                  " parameter values, got " + std::to_string(values.size()));
  };
  // The table policies start at zero: the values are copied in, then checked as a checkpoint's.
  auto load_table = [&](auto policy) {
    require(std::size_t(policy.parameters().size()));
    std::copy(values.begin(), values.end(), policy.parameters().data());
    policy.validate();
    f(policy);
  };
  if (spec.kind == "none") {
    f(relbias::no_bias<S>{spec.heads});
  } else if (spec.kind == "alibi") {
    require(heads);  // the trainable policy: its forward is the fixed one's, its backward can train the slopes
    f(relbias::alibi<S, true>{values});
  } else if (spec.kind == "t5") {
    load_table(relbias::t5<S>{spec.heads, mode, spec.num_buckets, spec.max_distance});
  } else if (spec.kind == "per_offset") {
    load_table(relbias::per_offset<S>{spec.heads, mode, spec.clip});
  } else if (spec.kind == "kerple_power") {
    require(2 * heads);
    f(relbias::kerple_power<S>{values.first(heads), values.subspan(heads)});
  } else if (spec.kind == "kerple_log") {
    require(2 * heads);
    f(relbias::kerple_log<S>{values.first(heads), values.subspan(heads)});
  } else if (spec.kind == "fire") {
    const std::size_t width = std::size_t(spec.width);
    require(2 * width + heads * width + heads + 2);
    const std::span<const S> w2 = values.subspan(2 * width, heads * width), b2 = values.subspan(2 * width + heads * width, heads);
    f(relbias::fire<S>{values.first(width), values.subspan(width, width), w2, b2, values[values.size() - 2], values.back(),
                       relbias::fire_config{spec.width, spec.init_L, spec.eps}});
  } else if (spec.kind == "sandwich") {
    f(relbias::sandwich<S>{spec.heads, spec.dim});
  } else {
    throw std::invalid_argument("relbias: unknown bias kind '" + spec.kind + "'");
  }
}

// One translation unit per scalar type (kernels_float.cpp, kernels_double.cpp, kernels_kv16.cpp),
// so a parallel build compiles them side by side. Each releases the GIL inside the kernel.

template <class S>
void forward(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const bias_spec& bias, const call_options& options,
             const tensor_desc& o, const span_desc& lse);

template <class S>
void backward(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const tensor_desc& o, const tensor_desc& d_out,
              const span_desc& lse, const bias_spec& bias, const call_options& options, const tensor_desc& dq,
              const tensor_desc& dk, const tensor_desc& dv, const span_desc& bias_grad);

/// The 16-bit forward: q float, k and v in Storage (Eigen::half or Eigen::bfloat16), o float.
template <class Storage>
void forward_kv16(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const bias_spec& bias,
                  const call_options& options, const tensor_desc& o, const span_desc& lse);

}  // namespace relbias_python
