// Peak memory of the fused kernels beyond their inputs, outputs and gradients.
//   bench_memory <policy> <L> <forward|backward>      (causal, 8 heads, d = 64, fp32, batch 1)
// Allocates and touches every tensor first, resets the kernel's peak-RSS mark
// (/proc/self/clear_refs), runs the pass once and prints the growth of the peak (VmHWM) over the
// resident size just before the call: what the kernel itself allocated, at its worst moment.
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

using namespace relbias;
using namespace relbias_bench;

namespace {

double status_mib(const std::string& key) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;  // kB -> MiB
  throw std::runtime_error("no " + key + " in /proc/self/status");
}

void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

template <class Bias>
void measure(const char* name, index_t length, bool backward) {
  const attention_options<float> options{.mask = masking::causal};
  const Bias bias = make_bias<Bias>(masking::causal);
  const auto q = random_input(length, heads, 1), k = random_input(length, heads, 2), v = random_input(length, heads, 3);
  const auto d_out = random_input(length, heads, 4);
  tensor<float> o(1, length, heads, dim), dq(1, length, heads, dim), dk(1, length, heads, dim), dv(1, length, heads, dim);
  std::vector<float> lse(std::size_t(heads * length), 0.0f), bias_grad;
  if constexpr (learned_bias<Bias>) bias_grad.assign(std::size_t(bias.parameters().size()), 0.0f);
  if (backward) attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);  // o and lse for the backward

  reset_peak();
  const double before = status_mib("VmRSS");
  if (backward)
    attention_backward(q.view(), k.view(), v.view(), o.view(), d_out.view(), lse, bias, options, dq.view(), dk.view(),
                       dv.view(), bias_grad);
  else
    attention(q.view(), k.view(), v.view(), bias, options, o.view(), lse);
  const double peak = status_mib("VmHWM");
  std::printf("policy=%s L=%ld pass=%s tensors_MiB=%.1f kernel_peak_MiB=%.2f\n", name, long(length),
              backward ? "backward" : "forward", before, peak - before);
}

}  // namespace

int main(int argc, char** argv) {
  return run_policy_command(argc, argv, []<class Bias>(const char* name, index_t length, bool backward) {
    measure<Bias>(name, length, backward);
  });
}
