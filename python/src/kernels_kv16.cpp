#include "kernels.hpp"

namespace relbias_python {
template void forward_kv16<Eigen::half>(const tensor_desc&, const tensor_desc&, const tensor_desc&, const bias_spec&,
                                        const call_options&, const tensor_desc&, const span_desc&);
template void forward_kv16<Eigen::bfloat16>(const tensor_desc&, const tensor_desc&, const tensor_desc&, const bias_spec&,
                                            const call_options&, const tensor_desc&, const span_desc&);
}  // namespace relbias_python
