// Running a T5 checkpoint's relative position bias. What a loader must get right:
//   - HF stores `relative_attention_bias.weight` as [num_buckets, num_heads], row-major; that is
//     exactly relbias::t5's table() (a new t5 starts with a zero table, so copy the weights in).
//   - Only block 0 of each stack has the table (has_relative_attention_bias); every layer of the
//     stack reuses it. Use one policy object per stack and pass it to every layer.
//   - The encoder's self-attention is bidirectional, the decoder's causal (the two stacks have
//     two different tables, bucketed differently). Cross-attention has no position bias.
//   - T5 has no 1/sqrt(d): run it with scale = 1.
// The output is checked against a hand-written loop over HF's formula, and against the
// materialising reference kernel.
#include <relbias/relbias.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

using relbias::index_t;

namespace {

const index_t heads = 4, dim = 8, seq = 40, num_buckets = 32, max_distance = 128;

/// Stand-in for the checkpoint's weight [num_buckets, num_heads], as it is stored on disk.
std::vector<float> checkpoint_weight(float salt) {
  std::vector<float> weight(std::size_t(num_buckets * heads));
  for (std::size_t n = 0; n < weight.size(); ++n) weight[n] = std::sin(salt * float(n + 1));
  return weight;
}

relbias::t5<float> load_t5(relbias::masking mode, const std::vector<float>& weight) {
  relbias::t5<float> bias{heads, mode, num_buckets, max_distance};  // zero table
  bias.table() = Eigen::Map<const relbias::t5<float>::table_matrix>(weight.data(), num_buckets, heads);
  return bias;
}

/// HF's T5Attention for one query row, written out: scores = q . k (no scaling) + the weight of
/// the bucket of relative_position = key - query, softmax over the visible keys, times v.
float hand_output(const relbias::tensor<float>& q, const relbias::tensor<float>& k, const relbias::tensor<float>& v,
                  const std::vector<float>& weight, bool bidirectional, index_t h, index_t i, index_t d) {
  const index_t visible = bidirectional ? seq : i + 1;
  std::vector<double> p(static_cast<std::size_t>(visible));
  double max_score = -INFINITY, sum = 0, out = 0;
  for (index_t j = 0; j < visible; ++j) {
    double score = 0;
    for (index_t e = 0; e < dim; ++e) score += double(q(0, i, h, e)) * double(k(0, j, h, e));
    const index_t bucket = relbias::t5_relative_position_bucket(j - i, bidirectional, num_buckets, max_distance);
    p[std::size_t(j)] = score + double(weight[std::size_t(bucket * heads + h)]);
    max_score = std::max(max_score, p[std::size_t(j)]);
  }
  for (index_t j = 0; j < visible; ++j) sum += std::exp(p[std::size_t(j)] - max_score);
  for (index_t j = 0; j < visible; ++j) out += std::exp(p[std::size_t(j)] - max_score) / sum * double(v(0, j, h, d));
  return float(out);
}

}  // namespace

int main() {
  const std::vector<float> encoder_weight = checkpoint_weight(0.37f), decoder_weight = checkpoint_weight(0.91f);
  const relbias::t5<float> encoder_bias = load_t5(relbias::masking::bidirectional, encoder_weight);
  const relbias::t5<float> decoder_bias = load_t5(relbias::masking::causal, decoder_weight);

  relbias::tensor<float> x(1, seq, heads, dim);  // stand-in for the hidden states
  for (index_t n = 0; n < x.size(); ++n) x.data()[n] = 0.5f * std::cos(0.13f * float(n));

  const relbias::attention_options<float> encoder{.mask = relbias::masking::bidirectional, .scale = 1.0f};
  const relbias::attention_options<float> decoder{.mask = relbias::masking::causal, .scale = 1.0f};

  // Two layers per stack, both with the stack's one table (a real layer would project x into
  // q, k, v with its own weights; the same tensor serves here).
  float worst = 0;
  for (int layer = 0; layer < 2; ++layer) {
    for (const bool bidirectional : {true, false}) {
      const auto& bias = bidirectional ? encoder_bias : decoder_bias;
      const auto& options = bidirectional ? encoder : decoder;
      const auto& weight = bidirectional ? encoder_weight : decoder_weight;
      const auto fused = relbias::attention(x.view(), x.view(), x.view(), bias, options);
      const auto reference = relbias::reference_attention(x.view(), x.view(), x.view(), bias, options);
      for (index_t h = 0; h < heads; ++h)
        for (index_t i = 0; i < seq; ++i)
          for (index_t d = 0; d < dim; ++d) {
            const float expected = hand_output(x, x, x, weight, bidirectional, h, i, d);
            worst = std::max({worst, std::abs(fused.out(0, i, h, d) - expected),
                              std::abs(reference.out(0, i, h, d) - expected)});
          }
    }
    // ... here the layer's output would become the next layer's x.
  }
  std::printf("T5 encoder (bidirectional) and decoder (causal), scale = 1, one table per stack:\n"
              "max |relbias - hand-written HF formula| = %.3g\n", double(worst));
  return worst < 1e-5f ? 0 : 1;
}
