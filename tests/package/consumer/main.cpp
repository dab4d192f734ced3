// A consumer of the installed or embedded package: one ALiBi attention, checked by hand.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  // One head (slope get_slopes(1) = [2^-8]), query at position 1, two keys with equal scores:
  // the weights are softmax(-1/256, 0), so o = (w0, 1 - w0) with w0 = e^(-1/256) / (e^(-1/256) + 1).
  const std::vector<double> q{0.0, 0.0}, k{1.0, 1.0, 1.0, 1.0}, v{1.0, 0.0, 0.0, 1.0};
  const relbias::alibi<double> bias{1};
  const relbias::attention_options<double> options{.q_start = 1};
  const auto r = relbias::attention(relbias::bshd(q.data(), 1, 1, 1, 2), relbias::bshd(k.data(), 1, 2, 1, 2),
                                    relbias::bshd(v.data(), 1, 2, 1, 2), bias, options);
  const double w0 = std::exp(-1.0 / 256.0), expected0 = w0 / (w0 + 1.0);
  std::printf("o = %.12f %.12f (expected %.12f %.12f)\n", r.out(0, 0, 0, 0), r.out(0, 0, 0, 1), expected0, 1 - expected0);
  return std::abs(r.out(0, 0, 0, 0) - expected0) < 1e-12 ? 0 : 1;
}
