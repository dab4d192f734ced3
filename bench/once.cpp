// One bidirectional pass of the fused kernels for one policy, for instruction counting:
//   bench_once <policy> <L> <forward|backward>
// "backward" runs the forward (for O and lse) and then the backward; scripts/bench-instructions.sh
// runs both under callgrind and subtracts. 8 heads, d = 64, fp32, batch 1, as in the suite.
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>

using namespace relbias;
using namespace relbias_bench;

namespace {

template <class Bias>
void run(index_t length, bool backward) {
  const attention_options<float> options{.mask = masking::bidirectional};
  const Bias bias = make_bias<Bias>(masking::bidirectional);
  const auto q = random_input(length, heads, 1), k = random_input(length, heads, 2), v = random_input(length, heads, 3);
  const auto d_out = random_input(length, heads, 4);
  const auto forward = attention(q.view(), k.view(), v.view(), bias, options);
  if (!backward) return;
  tensor<float> dq(1, length, heads, dim), dk(1, length, heads, dim), dv(1, length, heads, dim);
  std::vector<float> bias_grad;
  if constexpr (learned_bias<Bias>) bias_grad.assign(std::size_t(bias.parameters().size()), 0.0f);
  attention_backward(q.view(), k.view(), v.view(), forward.out.view(), d_out.view(), forward.lse, bias, options,
                     dq.view(), dk.view(), dv.view(), bias_grad);
}

}  // namespace

int main(int argc, char** argv) {
  return run_policy_command(argc, argv, []<class Bias>(const char*, index_t length, bool backward) {
    run<Bias>(length, backward);
  });
}
