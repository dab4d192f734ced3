#pragma once
// The definitions behind dispatch.hpp's forward, backward and forward_kv16, instantiated once per
// scalar type by kernels_*.cpp. Policies are built with the GIL held (they may throw); the GIL is
// released while the kernel runs, so other Python threads (a data loader) keep going.

#include "dispatch.hpp"

#include <pybind11/pybind11.h>

namespace relbias_python {

template <class S>
void forward(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const bias_spec& bias, const call_options& options,
             const tensor_desc& o, const span_desc& lse) {
  const relbias::attention_options<S> opts = options.to<S>(q[2]);
  with_policy<S>(bias, [&](const auto& policy) {
    pybind11::gil_scoped_release release;
    relbias::attention(view_of<const S>(q), view_of<const S>(k), view_of<const S>(v), policy, opts, view_of<S>(o), span_of<S>(lse));
  });
}

template <class S>
void backward(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const tensor_desc& o, const tensor_desc& d_out,
              const span_desc& lse, const bias_spec& bias, const call_options& options, const tensor_desc& dq,
              const tensor_desc& dk, const tensor_desc& dv, const span_desc& bias_grad) {
  const relbias::attention_options<S> opts = options.to<S>(q[2]);
  with_policy<S>(bias, [&](const auto& policy) {
    pybind11::gil_scoped_release release;
    relbias::attention_backward(view_of<const S>(q), view_of<const S>(k), view_of<const S>(v), view_of<const S>(o),
                                view_of<const S>(d_out), span_of<const S>(lse), policy, opts, view_of<S>(dq), view_of<S>(dk),
                                view_of<S>(dv), span_of<S>(bias_grad));
  });
}

template <class Storage>
void forward_kv16(const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const bias_spec& bias,
                  const call_options& options, const tensor_desc& o, const span_desc& lse) {
  const relbias::attention_options<float> opts = options.to<float>(q[2]);
  with_policy<float>(bias, [&](const auto& policy) {
    pybind11::gil_scoped_release release;
    relbias::attention(view_of<const float>(q), view_of<const Storage>(k), view_of<const Storage>(v), policy, opts,
                       view_of<float>(o), span_of<float>(lse));
  });
}

}  // namespace relbias_python
