// Train a learned bias inside your own model: forward, backward, optimiser step, save.
// The "model" here is one causal attention layer whose output should match a teacher's (ALiBi);
// the student learns a per-offset table. In a real model, dq, dk and dv continue into your
// projections and bias_grad sums over every layer that shares the policy.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

int main() {
  const relbias::index_t batch = 2, seq = 32, heads = 4, dim = 16;
  const auto shape = [&](float* p) { return relbias::bshd(p, batch, seq, heads, dim); };
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(std::size_t(batch * seq * heads * dim)), k(q.size()), v(q.size());
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(gen);
  const relbias::attention_options<float> options{.mask = relbias::masking::causal};

  // The targets: attention under a bias we pretend not to know.
  std::vector<float> target(q.size());
  relbias::attention(shape(q.data()), shape(k.data()), shape(v.data()), relbias::alibi<float>{heads}, options, shape(target.data()));

  relbias::per_offset<float> bias(heads, relbias::masking::causal, seq);  // one entry per offset, zeros
  relbias::adam<float> optimiser(0.05f);
  std::vector<float> o(q.size()), d_out(q.size()), dq(q.size()), dk(q.size()), dv(q.size());
  std::vector<float> lse(std::size_t(batch * heads * seq)), bias_grad(std::size_t(bias.parameters().size()));
  float first_loss = 0, loss = 0;
  for (int step = 0; step < 200; ++step) {
    // Forward, keeping lse for the backward.
    relbias::attention(shape(q.data()), shape(k.data()), shape(v.data()), bias, options, shape(o.data()), lse);
    loss = 0;  // mean squared error, and its gradient dL/dO
    for (std::size_t n = 0; n < o.size(); ++n) {
      loss += (o[n] - target[n]) * (o[n] - target[n]) / float(o.size());
      d_out[n] = 2 * (o[n] - target[n]) / float(o.size());
    }
    if (step == 0) first_loss = loss;
    // Backward: bias_grad is accumulated into (+=), so clear it first.
    std::fill(bias_grad.begin(), bias_grad.end(), 0.0f);
    relbias::attention_backward(shape(q.data()), shape(k.data()), shape(v.data()), shape(o.data()), shape(d_out.data()), lse,
                                bias, options, shape(dq.data()), shape(dk.data()), shape(dv.data()), bias_grad);
    optimiser.step(bias, std::span<const float>(bias_grad));  // then bias.project() for policies that have one
  }
  const auto path = std::filesystem::temp_directory_path() / "relbias_example_04.bin";
  relbias::save_parameters(bias, path);

  relbias::per_offset<float> reloaded(heads, relbias::masking::causal, seq);
  relbias::load_parameters(reloaded, path);
  std::filesystem::remove(path);
  // Head 0's ALiBi slope is 1/4: the learned table should fall by about 1/4 per offset.
  const float learned_step = bias.table()(0, 1) - bias.table()(0, 2);
  std::printf("loss %.2e -> %.2e; head 0 learned b(1) - b(2) = %.3f (ALiBi: 0.250)\n", double(first_loss), double(loss),
              double(learned_step));
  const bool learned = loss < first_loss / 20 && std::abs(learned_step - 0.25f) < 0.05f;
  return learned && reloaded.parameters() == bias.parameters() ? 0 : 1;
}
