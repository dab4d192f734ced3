// relbias._relbias: the fused kernels for the Python package (python/relbias). The Python side
// checks devices, dtypes and layouts and describes each tensor by pointer, shape and strides
// (dispatch.hpp); std::invalid_argument from relbias becomes ValueError with the same message
// (pybind11's own translation).

#include "dispatch.hpp"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

namespace py = pybind11;
using namespace relbias_python;

namespace {

template <class Policy>
std::vector<double> values_of(const Policy& policy) {
  const auto p = policy.parameters();
  return {p.data(), p.data() + p.size()};
}

relbias::masking mode_of(bool causal) { return causal ? relbias::masking::causal : relbias::masking::bidirectional; }

void forward_any(const std::string& dtype, const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const bias_spec& bias,
                 const call_options& options, const tensor_desc& o, const span_desc& lse) {
  if (dtype == "float32") return forward<float>(q, k, v, bias, options, o, lse);
  if (dtype == "float64") return forward<double>(q, k, v, bias, options, o, lse);
  if (dtype == "float16") return forward_kv16<Eigen::half>(q, k, v, bias, options, o, lse);
  if (dtype == "bfloat16") return forward_kv16<Eigen::bfloat16>(q, k, v, bias, options, o, lse);
  throw std::invalid_argument("relbias.attention: unsupported dtype " + dtype);
}

void backward_any(const std::string& dtype, const tensor_desc& q, const tensor_desc& k, const tensor_desc& v, const tensor_desc& o,
                  const tensor_desc& d_out, const span_desc& lse, const bias_spec& bias, const call_options& options,
                  const tensor_desc& dq, const tensor_desc& dk, const tensor_desc& dv, const span_desc& bias_grad) {
  if (dtype == "float32") return backward<float>(q, k, v, o, d_out, lse, bias, options, dq, dk, dv, bias_grad);
  if (dtype == "float64") return backward<double>(q, k, v, o, d_out, lse, bias, options, dq, dk, dv, bias_grad);
  throw std::invalid_argument("relbias.attention: the backward takes float32 or float64, got " + dtype);
}

}  // namespace

PYBIND11_MODULE(_relbias, m) {
  m.doc() = "relbias's fused attention kernels; use the relbias package, not this module";

  py::class_<bias_spec>(m, "BiasSpec")
      .def(py::init<>())
      .def_readwrite("kind", &bias_spec::kind)
      .def_readwrite("heads", &bias_spec::heads)
      .def_readwrite("causal", &bias_spec::causal)
      .def_readwrite("num_buckets", &bias_spec::num_buckets)
      .def_readwrite("max_distance", &bias_spec::max_distance)
      .def_readwrite("clip", &bias_spec::clip)
      .def_readwrite("dim", &bias_spec::dim)
      .def_readwrite("width", &bias_spec::width)
      .def_readwrite("init_L", &bias_spec::init_L)
      .def_readwrite("eps", &bias_spec::eps)
      .def_readwrite("params", &bias_spec::params);

  py::class_<call_options>(m, "Options")
      .def(py::init<>())
      .def_readwrite("causal", &call_options::causal)
      .def_readwrite("window", &call_options::window)
      .def_readwrite("scale", &call_options::scale)
      .def_readwrite("q_start", &call_options::q_start)
      .def_readwrite("k_start", &call_options::k_start)
      .def_readwrite("cu_seqlens_q", &call_options::cu_seqlens_q)
      .def_readwrite("cu_seqlens_k", &call_options::cu_seqlens_k)
      .def_readwrite("seq_lengths", &call_options::seq_lengths)
      .def_readwrite("num_threads", &call_options::num_threads);

  m.def("forward", &forward_any, "o, lse = attention(q, k, v): dtype names q's type (float16/bfloat16: k and v's, q float32)");
  m.def("backward", &backward_any, "dq, dk, dv, bias_grad (+=) from the forward's o and lse");
  m.def("check_bias", [](const bias_spec& spec) { with_policy<double>(spec, [](const auto&) {}); },
        "Builds the policy from double values: raises ValueError for what the C++ constructor rejects");

  // Initial values from the C++ constructors, so a module starts where relbias's C++ policy does.
  m.def("alibi_slopes", [](index_t heads, double max_bias) { return values_of(relbias::alibi<double, true>{heads, max_bias}); });
  m.def("kerple_power_init", [](index_t heads, std::uint64_t seed) { return values_of(relbias::kerple_power<double>{heads, seed}); });
  m.def("kerple_log_init", [](index_t heads, std::uint64_t seed) { return values_of(relbias::kerple_log<double>{heads, seed}); });
  m.def("fire_init", [](index_t heads, std::uint64_t seed, index_t width, double init_L, double eps) {
    return values_of(relbias::fire<double>{heads, seed, relbias::fire_config{width, init_L, eps}});
  });
  m.def("t5_init", [](index_t heads, bool causal, index_t num_buckets, index_t max_distance, std::uint64_t seed, double d_model,
                      double factor) {
    relbias::t5<double> policy{heads, mode_of(causal), num_buckets, max_distance};
    policy.reset_parameters(seed, d_model, factor);
    return values_of(policy);
  });
  m.def("per_offset_init", [](index_t heads, bool causal, index_t clip, std::uint64_t seed, double std) {
    relbias::per_offset<double> policy{heads, mode_of(causal), clip};
    policy.reset_parameters(seed, std);
    return values_of(policy);
  });
  m.def("t5_bucket", [](index_t relative_position, bool bidirectional, index_t num_buckets, index_t max_distance) {
    return relbias::t5_relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance);
  }, "HF's _relative_position_bucket (relative_position = key - query)");
}
