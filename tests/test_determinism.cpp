// Same values -> same bits, wherever they live: the fused forward and backward (with the bias
// gradient) give bit-identical results for inputs copied to buffers at different addresses
// (offsets of 1..3 elements, so different alignments mod 64) and after the heap was perturbed,
// so that the library's own buffers land elsewhere too. Eigen's vectorised reductions peel
// elements up to the first aligned address, so a reduction over memory of unknown alignment
// rounds differently at a different address; this test catches any such reduction.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/t5.hpp>

#include <cstring>
#include <memory>
#include <span>
#include <vector>

using namespace relbias;

namespace {

constexpr index_t batch = 1, seq = 67, heads = 2, dim = 37;  // dim: several AVX-512 packets and a tail

/// A tensor's values stored `shift` elements past the start of a fresh heap buffer.
template <class S>
struct shifted_tensor {
  std::vector<S> storage;
  tensor_view<S> view;
  shifted_tensor(const tensor<S>& values, index_t shift) : storage(std::size_t(shift + values.size())) {
    std::copy(values.data(), values.data() + values.size(), storage.begin() + shift);
    view = bshd(storage.data() + shift, batch, seq, heads, dim);
  }
};

template <class S>
struct results {
  std::vector<S> out, lse, dq, dk, dv, bias_grad;
};

template <class S>
std::vector<S> values_of(tensor_view<const S> t) {
  return std::vector<S>(t.data, t.data + t.batch * t.seq * t.heads * t.dim);
}

/// Forward then backward with every buffer `shift` elements off its allocation's start, after
/// leaving `heap_noise` small blocks allocated so later mallocs land at other addresses.
template <class Bias, class S = typename Bias::scalar_type>
results<S> run(const Bias& bias, index_t shift, int heap_noise, std::vector<std::unique_ptr<std::vector<char>>>& noise) {
  for (int n = 1; n <= heap_noise; ++n) noise.push_back(std::make_unique<std::vector<char>>(std::size_t(4 * n)));
  const attention_options<S> options{.mask = masking::causal};
  const shifted_tensor<S> q(relbias_test::random_tensor<S>(batch, seq, heads, dim, 1), shift);
  const shifted_tensor<S> k(relbias_test::random_tensor<S>(batch, seq, heads, dim, 2), shift);
  const shifted_tensor<S> v(relbias_test::random_tensor<S>(batch, seq, heads, dim, 3), shift);
  const shifted_tensor<S> d_out(relbias_test::random_tensor<S>(batch, seq, heads, dim, 4), shift);
  shifted_tensor<S> out(tensor<S>(batch, seq, heads, dim), shift), dq(tensor<S>(batch, seq, heads, dim), shift),
      dk(tensor<S>(batch, seq, heads, dim), shift), dv(tensor<S>(batch, seq, heads, dim), shift);
  std::vector<S> lse(std::size_t(shift + batch * heads * seq)), bias_grad(std::size_t(shift + bias.parameters().size()));
  const std::span<S> lse_span(lse.data() + shift, std::size_t(batch * heads * seq));
  const std::span<S> bias_grad_span(bias_grad.data() + shift, std::size_t(bias.parameters().size()));

  attention(tensor_view<const S>(q.view), k.view, v.view, bias, options, out.view, lse_span);
  attention_backward(tensor_view<const S>(q.view), k.view, v.view, out.view, d_out.view, lse_span, bias, options, dq.view,
                     dk.view, dv.view, bias_grad_span);
  return {values_of<S>(out.view), {lse_span.begin(), lse_span.end()}, values_of<S>(dq.view), values_of<S>(dk.view),
          values_of<S>(dv.view), {bias_grad_span.begin(), bias_grad_span.end()}};
}

template <class S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
}

template <class Bias>
void check_address_independent(const Bias& bias) {
  using S = typename Bias::scalar_type;
  std::vector<std::unique_ptr<std::vector<char>>> noise;
  const results<S> first = run(bias, 0, 0, noise);
  for (index_t shift : {1, 2, 3})
    for (int heap_noise : {1, 7, 15}) {
      INFO("shift=" << shift << " heap_noise=" << heap_noise);
      const results<S> again = run(bias, shift, heap_noise, noise);
      CHECK(same_bits(again.out, first.out));
      CHECK(same_bits(again.lse, first.lse));
      CHECK(same_bits(again.dq, first.dq));
      CHECK(same_bits(again.dk, first.dk));
      CHECK(same_bits(again.dv, first.dv));
      CHECK(same_bits(again.bias_grad, first.bias_grad));
    }
}

}  // namespace

TEMPLATE_TEST_CASE("determinism: same values give the same bits at any address", "[determinism]", float, double) {
  using S = TestType;
  SECTION("kerple_power") { check_address_independent(kerple_power<S>{heads, 3}); }
  SECTION("kerple_log") { check_address_independent(kerple_log<S>{heads, 3}); }
  SECTION("fire") { check_address_independent(fire<S>{heads, 5}); }
  SECTION("t5") {
    t5<S> bias{heads, masking::causal, 8, 32};
    bias.reset_parameters(1, 2.0);
    check_address_independent(bias);
  }
  SECTION("per_offset") {
    per_offset<S> bias{heads, masking::causal, seq};
    bias.reset_parameters(1, 2.0);
    check_address_independent(bias);
  }
  SECTION("alibi") { check_address_independent(alibi<S, true>{heads}); }
}
