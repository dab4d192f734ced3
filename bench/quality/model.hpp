#pragma once
// The quality benchmark's model: a small causal transformer whose attention runs through
// relbias::attention and relbias::attention_backward with one bias policy shared by every layer
// (as T5 and KERPLE share theirs). Benchmark code, not library API.
//
//   tokens -> embedding E (V, d) -> [pre-LN block] x layers -> LN -> logits = x E^T (tied)
//   block:  x += (attention(LN1(x) Wq, LN1(x) Wk, LN1(x) Wv) with the bias, causal) Wo
//           x += gelu(LN2(x) W1 + c1) W2 + c2
//
// No absolute position embedding: the bias is the model's only positional signal, so the
// schemes differ in exactly one place. Templated on the scalar so that the gradient test runs in
// double; the benchmark trains in float.

#include <relbias/relbias.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace quality {

using relbias::index_t;
template <class S>
using matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using matrix_map = Eigen::Map<matrix<S>>;
template <class S>
using row_vector = Eigen::Matrix<S, 1, Eigen::Dynamic>;
/// Flat weights and gradients, mapped slot by slot: aligned so Eigen's reductions over the slots
/// round the same wherever the heap puts them (a re-run gives the same bits).
template <class S>
using flat_vector = relbias::detail::aligned_vector<S>;

/// The benchmark's default: 4 heads of 8 (d_model 32, 28 K weights). At d_model 64 (106 K) the
/// whole plan took 23-32 minutes of the 15 it is allowed on two cores, and trained no nearer to
/// a flat curve per character (bench/README.md, "Why this model").
struct model_config {
  index_t vocab = 97;
  index_t d_model = 32;
  index_t heads = 4;
  index_t layers = 2;
  index_t mlp_ratio = 4;

  index_t head_dim() const { return d_model / heads; }
  index_t hidden() const { return mlp_ratio * d_model; }
};

/// Where one weight matrix sits in the flat parameter vector.
struct slot {
  index_t offset = 0, rows = 0, cols = 0;
};

struct layer_slots {
  slot ln1_gain, ln1_shift, wqkv, wo, ln2_gain, ln2_shift, w1, c1, w2, c2;  // wqkv = [Wq | Wk | Wv]
};

/// Every model weight in one flat vector (so one optimiser state covers them all), and the
/// named slots that view into it. Gradients use the same layout.
struct model_layout {
  slot embedding, final_gain, final_shift;
  std::vector<layer_slots> layers;
  index_t size = 0;

  explicit model_layout(const model_config& c) {
    embedding = add(c.vocab, c.d_model);
    for (index_t l = 0; l < c.layers; ++l) {
      layer_slots s;
      s.ln1_gain = add(1, c.d_model), s.ln1_shift = add(1, c.d_model);
      s.wqkv = add(c.d_model, 3 * c.d_model);
      s.wo = add(c.d_model, c.d_model);
      s.ln2_gain = add(1, c.d_model), s.ln2_shift = add(1, c.d_model);
      s.w1 = add(c.d_model, c.hidden()), s.c1 = add(1, c.hidden());
      s.w2 = add(c.hidden(), c.d_model), s.c2 = add(1, c.d_model);
      layers.push_back(s);
    }
    final_gain = add(1, c.d_model), final_shift = add(1, c.d_model);
  }

 private:
  slot add(index_t rows, index_t cols) {
    const slot s{size, rows, cols};
    size += rows * cols;
    return s;
  }
};

template <class S>
matrix_map<S> view(flat_vector<S>& flat, const slot& s) {
  return matrix_map<S>(flat.data() + s.offset, s.rows, s.cols);
}
template <class S>
Eigen::Map<const matrix<S>> view(const flat_vector<S>& flat, const slot& s) {
  return Eigen::Map<const matrix<S>>(flat.data() + s.offset, s.rows, s.cols);
}

/// GPT-2's initialisation: N(0, 0.02) for matrices, LN gains 1, shifts and biases 0; the
/// residual output projections (Wo, W2) scaled by 1/sqrt(2 layers).
template <class S>
flat_vector<S> initial_weights(const model_config& c, const model_layout& layout, std::uint64_t seed) {
  flat_vector<S> w(std::size_t(layout.size), S(0));
  relbias::detail::random_stream rng(seed);
  auto normal = [&](const slot& s, double std) {
    for (S& x : view(w, s).reshaped()) x = S(rng.normal(0.0, std));
  };
  const double residual_std = 0.02 / std::sqrt(2.0 * double(c.layers));
  normal(layout.embedding, 0.02);
  for (const layer_slots& s : layout.layers) {
    view(w, s.ln1_gain).setOnes(), view(w, s.ln2_gain).setOnes();
    normal(s.wqkv, 0.02), normal(s.wo, residual_std);
    normal(s.w1, 0.02), normal(s.w2, residual_std);
  }
  view(w, layout.final_gain).setOnes();
  return w;
}

// ---- Pieces with their own backward -----------------------------------------------------------

/// Layer norm over each row (eps 1e-5, PyTorch's); keeps what its backward needs.
template <class S>
struct layer_norm {
  matrix<S> normalised;              // (N, d) (x - mean) * rstd
  Eigen::Matrix<S, Eigen::Dynamic, 1> rstd;  // (N)

  matrix<S> forward(const matrix<S>& x, const row_vector<S>& gain, const row_vector<S>& shift) {
    const S eps = S(1e-5);
    const auto mean = x.rowwise().mean();
    normalised = x.colwise() - mean;
    rstd = (normalised.array().square().rowwise().mean() + eps).rsqrt();
    normalised.array().colwise() *= rstd.array();
    return (normalised.array().rowwise() * gain.array()).rowwise() + shift.array();
  }

  /// dx from dy; adds into the gain and shift gradients.
  matrix<S> backward(const matrix<S>& dy, const row_vector<S>& gain, matrix_map<S> d_gain, matrix_map<S> d_shift) const {
    d_gain += (dy.array() * normalised.array()).colwise().sum().matrix();
    d_shift += dy.colwise().sum();
    const matrix<S> dn = dy.array().rowwise() * gain.array();
    const auto mean_dn = dn.rowwise().mean();
    const auto mean_dn_n = (dn.array() * normalised.array()).rowwise().mean();
    matrix<S> dx = dn.colwise() - mean_dn;
    dx.array() -= normalised.array().colwise() * mean_dn_n;
    dx.array().colwise() *= rstd.array();
    return dx;
  }
};

/// GELU, tanh approximation (GPT-2's), over a whole matrix: writes the activation and its
/// derivative (which the backward needs, so tanh runs once). Whole-array expressions run in
/// Eigen's packets (its float tanh is a rational approximation within a few ulp); a scalar
/// std::tanh per element (libm's tanhf and the expm1f under it) took a third of the step. Blocks
/// of 16 rows keep the tanh temporary in L1 instead of a pass through memory of its own.
template <class S>
void gelu(const matrix<S>& x, matrix<S>& activation, matrix<S>& derivative) {
  const S k = S(0.7978845608028654), a = S(0.044715);
  constexpr index_t block_rows = 16;
  activation.resize(x.rows(), x.cols());
  derivative.resize(x.rows(), x.cols());
  matrix<S> t;
  for (index_t r = 0; r < x.rows(); r += block_rows) {
    const index_t rows = std::min(block_rows, x.rows() - r);
    const auto u = x.middleRows(r, rows).array();
    t = (k * (u + a * u.cube())).tanh();
    activation.middleRows(r, rows).array() = S(0.5) * u * (S(1) + t.array());
    derivative.middleRows(r, rows).array() =
        S(0.5) * (S(1) + t.array()) + (S(0.5) * k) * u * (S(1) - t.array().square()) * (S(1) + (S(3) * a) * u.square());
  }
}

/// What one block's backward needs from its forward.
template <class S>
struct block_cache {
  matrix<S> qkv;           // (N, 3d) = [q | k | v], each [batch, seq, heads, head_dim]
  matrix<S> o;             // (N, d)
  std::vector<S> lse;      // [batch][heads][seq]
  matrix<S> mlp_pre;       // (N, hidden) before GELU
  matrix<S> mlp_act;       // (N, hidden) after GELU
  matrix<S> mlp_slope;     // (N, hidden) GELU's derivative at mlp_pre
  layer_norm<S> ln1, ln2;
  matrix<S> ln1_out, ln2_out;
};

/// The model around one bias policy. forward() returns the mean cross-entropy in nats over the
/// scored positions and keeps what backward() needs; backward() fills the weight gradient and
/// adds the bias-parameter gradient (summed over the layers that share the policy).
template <class S, class Bias>
class model {
 public:
  model(const model_config& config, std::uint64_t seed)
      : config_(config), layout_(config), weights_(initial_weights<S>(config, layout_, seed)),
        grad_(std::size_t(layout_.size), S(0)) {}

  const model_config& config() const { return config_; }
  const model_layout& layout() const { return layout_; }
  flat_vector<S>& weights() { return weights_; }
  flat_vector<S>& gradient() { return grad_; }

  /// tokens, targets: (batch * seq) row-major; a negative target is not scored. Returns the mean
  /// loss (nats) over scored positions; per_position, if not empty, receives each position's loss.
  S forward(const Bias& bias, std::span<const int> tokens, std::span<const int> targets, index_t batch, index_t seq,
            std::span<S> per_position = {}) {
    batch_ = batch, seq_ = seq;
    tokens_.assign(tokens.begin(), tokens.end());
    const index_t n = batch * seq;
    const auto embedding = view(weights_, layout_.embedding);
    matrix<S> x(n, config_.d_model);
    for (index_t r = 0; r < n; ++r) x.row(r) = embedding.row(tokens[std::size_t(r)]);
    caches_.resize(std::size_t(config_.layers));
    for (index_t l = 0; l < config_.layers; ++l) x = block_forward(bias, l, x);

    const matrix<S> final_out = final_norm_.forward(x, row(layout_.final_gain), row(layout_.final_shift));
    logits_ = final_out * embedding.transpose();  // (N, V)
    return softmax_cross_entropy(targets, per_position);
  }

  /// Call after forward() with the same bias. Overwrites gradient(); adds into bias_grad (laid
  /// out like bias.parameters(); empty for policies without parameters).
  void backward(const Bias& bias, std::span<S> bias_grad) {
    std::fill(grad_.begin(), grad_.end(), S(0));
    const auto embedding = view(weights_, layout_.embedding);
    auto d_embedding = view(grad_, layout_.embedding);
    // logits = F E^T: dF = dlogits E, dE += dlogits^T F.
    const matrix<S> final_out = (final_norm_.normalised.array().rowwise() * row(layout_.final_gain).array()).rowwise() +
                                row(layout_.final_shift).array();
    d_embedding.noalias() += d_logits_.transpose() * final_out;
    const matrix<S> d_final = d_logits_ * embedding;
    matrix<S> dx = final_norm_.backward(d_final, row(layout_.final_gain), view(grad_, layout_.final_gain),
                                        view(grad_, layout_.final_shift));
    for (index_t l = config_.layers - 1; l >= 0; --l) dx = block_backward(bias, l, dx, bias_grad);
    for (index_t r = 0; r < dx.rows(); ++r) d_embedding.row(tokens_[std::size_t(r)]) += dx.row(r);
  }

  /// The logits of the last forward, (batch * seq, vocab).
  const matrix<S>& logits() const { return logits_; }

 private:
  row_vector<S> row(const slot& s) const { return view(weights_, s); }

  /// [batch, seq, heads, head_dim] over (N, d) columns [first, first + d) of m (q, k and v are
  /// column blocks of one (N, 3d) matrix: one product with [Wq | Wk | Wv] instead of three).
  template <class M>
  auto heads_view(M& m, index_t first = 0) const {
    using T = std::remove_pointer_t<decltype(m.data())>;
    const index_t d = config_.d_model, stride = m.cols();
    return relbias::tensor_view<T>{m.data() + first * d, batch_, seq_, config_.heads, config_.head_dim(),
                                   seq_ * stride, stride, config_.head_dim()};
  }
  static relbias::attention_options<S> causal() { return {.mask = relbias::masking::causal}; }

  matrix<S> block_forward(const Bias& bias, index_t l, const matrix<S>& x) {
    const layer_slots& s = layout_.layers[std::size_t(l)];
    block_cache<S>& c = caches_[std::size_t(l)];
    c.ln1_out = c.ln1.forward(x, row(s.ln1_gain), row(s.ln1_shift));
    c.qkv.noalias() = c.ln1_out * view(weights_, s.wqkv);
    c.o.resize(x.rows(), config_.d_model);
    c.lse.resize(std::size_t(batch_ * config_.heads * seq_));
    const matrix<S>& qkv = c.qkv;
    relbias::attention(heads_view(qkv, 0), heads_view(qkv, 1), heads_view(qkv, 2), bias, causal(), heads_view(c.o),
                       std::span<S>(c.lse));
    matrix<S> y = x + c.o * view(weights_, s.wo);

    c.ln2_out = c.ln2.forward(y, row(s.ln2_gain), row(s.ln2_shift));
    c.mlp_pre.noalias() = c.ln2_out * view(weights_, s.w1);
    c.mlp_pre.rowwise() += row(s.c1);
    gelu(c.mlp_pre, c.mlp_act, c.mlp_slope);
    y.noalias() += c.mlp_act * view(weights_, s.w2);
    y.rowwise() += row(s.c2);
    return y;
  }

  matrix<S> block_backward(const Bias& bias, index_t l, const matrix<S>& dy, std::span<S> bias_grad) {
    const layer_slots& s = layout_.layers[std::size_t(l)];
    const block_cache<S>& c = caches_[std::size_t(l)];
    // MLP: y = x1 + gelu(LN2(x1) W1 + c1) W2 + c2
    view(grad_, s.c2) += dy.colwise().sum();
    view(grad_, s.w2).noalias() += c.mlp_act.transpose() * dy;
    matrix<S> d_pre = dy * view(weights_, s.w2).transpose();
    d_pre.array() *= c.mlp_slope.array();
    view(grad_, s.c1) += d_pre.colwise().sum();
    view(grad_, s.w1).noalias() += c.ln2_out.transpose() * d_pre;
    const matrix<S> d_ln2 = d_pre * view(weights_, s.w1).transpose();
    const matrix<S> dx1 = dy + c.ln2.backward(d_ln2, row(s.ln2_gain), view(grad_, s.ln2_gain), view(grad_, s.ln2_shift));

    // Attention: x1 = x + attention(...) Wo
    view(grad_, s.wo).noalias() += c.o.transpose() * dx1;
    const matrix<S> d_o = dx1 * view(weights_, s.wo).transpose();
    matrix<S> d_qkv(c.qkv.rows(), c.qkv.cols());  // (N, 3d) = [dq | dk | dv]
    const matrix<S>& o = c.o;
    relbias::attention_backward(heads_view(c.qkv, 0), heads_view(c.qkv, 1), heads_view(c.qkv, 2), heads_view(o),
                                heads_view(d_o), std::span<const S>(c.lse), bias, causal(), heads_view(d_qkv, 0),
                                heads_view(d_qkv, 1), heads_view(d_qkv, 2), bias_grad);
    view(grad_, s.wqkv).noalias() += c.ln1_out.transpose() * d_qkv;
    const matrix<S> d_ln1 = d_qkv * view(weights_, s.wqkv).transpose();
    return dx1 + c.ln1.backward(d_ln1, row(s.ln1_gain), view(grad_, s.ln1_gain), view(grad_, s.ln1_shift));
  }

  /// Mean cross-entropy over scored targets; leaves dloss/dlogits in d_logits_. The softmax runs
  /// over the whole (N, V) matrix at once, not row by row.
  S softmax_cross_entropy(std::span<const int> targets, std::span<S> per_position) {
    index_t scored = 0;
    for (int t : targets) scored += t >= 0;
    const Eigen::Matrix<S, Eigen::Dynamic, 1> row_max = logits_.rowwise().maxCoeff();  // (N)
    // Shift, then exp over the plain array: Eigen runs a whole-array exp in packets, but an exp
    // of the broadcast expression called libm's scalar expf per element (4 % of the step).
    d_logits_ = logits_.colwise() - row_max;  // (N, V)
    d_logits_.array() = d_logits_.array().exp();
    const Eigen::Matrix<S, Eigen::Dynamic, 1> row_sum = d_logits_.rowwise().sum();    // (N)
    const S weight = scored > 0 ? S(1) / S(scored) : S(0);
    double total = 0;
    for (index_t r = 0; r < logits_.rows(); ++r) {
      const int target = targets[std::size_t(r)];
      const S loss = target >= 0 ? std::log(row_sum[r]) - (logits_(r, target) - row_max[r]) : S(0);
      if (!per_position.empty()) per_position[std::size_t(r)] = loss;
      total += double(loss);
      if (target < 0) {
        d_logits_.row(r).setZero();
        continue;
      }
      d_logits_.row(r) *= weight / row_sum[r];
      d_logits_(r, target) -= weight;
    }
    return scored > 0 ? S(total / double(scored)) : S(0);
  }

 private:
  model_config config_;
  model_layout layout_;
  flat_vector<S> weights_, grad_;
  index_t batch_ = 0, seq_ = 0;
  std::vector<block_cache<S>> caches_;
  layer_norm<S> final_norm_;
  matrix<S> logits_, d_logits_;
  std::vector<int> tokens_;  // of the last forward, for the embedding gradient
};

}  // namespace quality
