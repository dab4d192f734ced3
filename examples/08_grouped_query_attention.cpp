// Grouped-query attention (GQA; multi-query attention is the case of one key/value head): q has
// Hq heads, k and v have Hk heads, Hk divides Hq, and query head h reads key/value head
// h / (Hq / Hk), the grouping of HF's repeat_kv. Pass the tensors as they are, nothing is
// copied or repeated. The bias has one head per query head.
//
// Checked against the same attention with k and v repeated to Hq heads, forward and backward:
// the gradient of a key/value head is the sum over the query heads of its group.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>

using relbias::index_t;

namespace {

/// k [B, L, Hk, D] repeated to [B, L, Hk * group, D]: head h holds k's head h / group.
relbias::tensor<double> repeat_kv(const relbias::tensor<double>& kv, index_t seq, index_t kv_heads, index_t group, index_t dim) {
  relbias::tensor<double> out(1, seq, kv_heads * group, dim);
  for (index_t s = 0; s < seq; ++s)
    for (index_t h = 0; h < kv_heads * group; ++h)
      for (index_t d = 0; d < dim; ++d) out(0, s, h, d) = kv(0, s, h / group, d);
  return out;
}

void fill(relbias::tensor<double>& t, double frequency) {
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = std::sin(frequency * double(n + 1));
}

}  // namespace

int main() {
  const index_t seq = 48, query_heads = 8, kv_heads = 2, group = query_heads / kv_heads, dim = 16;
  relbias::tensor<double> q(1, seq, query_heads, dim), k(1, seq, kv_heads, dim), v(1, seq, kv_heads, dim);
  relbias::tensor<double> d_out(1, seq, query_heads, dim);
  fill(q, 0.7);
  fill(k, 0.3);
  fill(v, 0.11);
  fill(d_out, 0.05);

  const relbias::alibi<double> bias{query_heads};  // one slope per query head
  const relbias::attention_options<double> options{.mask = relbias::masking::causal};
  const auto gqa = relbias::attention(q.view(), k.view(), v.view(), bias, options);

  const auto k_full = repeat_kv(k, seq, kv_heads, group, dim), v_full = repeat_kv(v, seq, kv_heads, group, dim);
  const auto mha = relbias::attention(q.view(), k_full.view(), v_full.view(), bias, options);
  double forward_error = 0;
  for (index_t n = 0; n < gqa.out.size(); ++n)
    forward_error = std::max(forward_error, std::abs(gqa.out.data()[n] - mha.out.data()[n]));

  // Backward: dk and dv come back with Hk heads, each the sum over its group.
  relbias::tensor<double> dq(1, seq, query_heads, dim), dk(1, seq, kv_heads, dim), dv(1, seq, kv_heads, dim);
  relbias::attention_backward(q.view(), k.view(), v.view(), gqa.out.view(), d_out.view(), gqa.lse, bias, options,
                              dq.view(), dk.view(), dv.view());
  relbias::tensor<double> dq_full(1, seq, query_heads, dim), dk_full(1, seq, query_heads, dim), dv_full(1, seq, query_heads, dim);
  relbias::attention_backward(q.view(), k_full.view(), v_full.view(), mha.out.view(), d_out.view(), mha.lse, bias, options,
                              dq_full.view(), dk_full.view(), dv_full.view());
  double backward_error = 0;
  for (index_t s = 0; s < seq; ++s)
    for (index_t d = 0; d < dim; ++d) {
      for (index_t h = 0; h < query_heads; ++h)
        backward_error = std::max(backward_error, std::abs(dq(0, s, h, d) - dq_full(0, s, h, d)));
      for (index_t g = 0; g < kv_heads; ++g) {
        double dk_sum = 0, dv_sum = 0;
        for (index_t h = g * group; h < (g + 1) * group; ++h) {
          dk_sum += dk_full(0, s, h, d);
          dv_sum += dv_full(0, s, h, d);
        }
        backward_error = std::max({backward_error, std::abs(dk(0, s, g, d) - dk_sum), std::abs(dv(0, s, g, d) - dv_sum)});
      }
    }
  std::printf("GQA, %ld query heads on %ld key/value heads: max |GQA - repeated-heads attention| = %.3g forward, "
              "%.3g backward\n", long(query_heads), long(kv_heads), forward_error, backward_error);
  return forward_error < 1e-12 && backward_error < 1e-12 ? 0 : 1;
}
