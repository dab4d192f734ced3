#include "kernels.hpp"

namespace relbias_python {
template void forward<float>(const tensor_desc&, const tensor_desc&, const tensor_desc&, const bias_spec&, const call_options&,
                             const tensor_desc&, const span_desc&);
template void backward<float>(const tensor_desc&, const tensor_desc&, const tensor_desc&, const tensor_desc&, const tensor_desc&,
                              const span_desc&, const bias_spec&, const call_options&, const tensor_desc&, const tensor_desc&,
                              const tensor_desc&, const span_desc&);
}  // namespace relbias_python
