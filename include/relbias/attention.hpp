#pragma once
// Fused attention forward. TEMPORARY: forwards to the reference kernel until the tiled kernel
// lands (same signature).

#include "relbias/attention_reference.hpp"

namespace relbias {

template <bias_policy Bias, class S = typename Bias::scalar_type>
void attention(tensor_view<const S> q, tensor_view<const S> k, tensor_view<const S> v, const Bias& bias,
               const attention_options<S>& options, tensor_view<S> o, std::span<S> lse = {}) {
  reference_attention(q, k, v, bias, options, o, lse);
}

template <bias_policy Bias, class S = typename Bias::scalar_type>
attention_result<S> attention(tensor_view<const S> q, tensor_view<const S> k, tensor_view<const S> v, const Bias& bias,
                              const attention_options<S>& options = {}) {
  return reference_attention(q, k, v, bias, options);
}

}  // namespace relbias
