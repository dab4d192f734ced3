#pragma once
// One training run of the quality benchmark: a scheme, a seed, a task (fortunes text or the
// probe), Adam on every parameter, evaluations along the way. Shared by bench_quality and the
// smoke test.

#include "quality/data.hpp"
#include "quality/model.hpp"

#include <relbias/relbias.hpp>

#include <chrono>
#include <ctime>
#include <cmath>
#include <numbers>
#include <stdexcept>
#include <string>
#include <vector>

namespace quality {

inline const std::vector<std::string> scheme_names = {"no_bias", "alibi",      "kerple_power", "kerple_log",
                                                      "t5",      "per_offset", "fire"};

/// Calls fn(policy) with the scheme's policy (float, causal, H heads), initialised as its
/// reference does: T5 HF's normal(0, d_model^-0.5), per-offset zeros clipped at the training
/// length, KERPLE and FIRE their reference draws.
template <class Fn>
auto with_scheme(const std::string& name, index_t heads, index_t train_length, index_t d_model, std::uint64_t seed, Fn&& fn) {
  using relbias::masking;
  if (name == "no_bias") return fn(relbias::no_bias<float>(heads));
  if (name == "alibi") return fn(relbias::alibi<float>(heads));
  if (name == "kerple_power") return fn(relbias::kerple_power<float>(heads, seed));
  if (name == "kerple_log") return fn(relbias::kerple_log<float>(heads, seed));
  if (name == "t5") {
    relbias::t5<float> t5(heads, masking::causal);
    t5.reset_parameters(seed, double(d_model));
    return fn(std::move(t5));
  }
  if (name == "per_offset") return fn(relbias::per_offset<float>(heads, masking::causal, train_length));
  if (name == "fire") return fn(relbias::fire<float>(heads, seed));
  // Heuristic, nothing to train. NeMo's language_model.py passes the head dimension as the
  // sinusoid dimension (hidden_size // num_attention_heads): d_model 64 over 4 heads gives d = 16.
  if (name == "sandwich") return fn(relbias::sandwich<float>(heads, d_model / heads));
  throw std::invalid_argument("quality::with_scheme: unknown scheme '" + name + "'");
}

/// relbias::adam steps the flat parameters of a learned policy. The model's weights are one flat
/// vector too, so this view lets the same optimiser (PyTorch's Adam) step them: a policy in
/// shape only, never used as a bias.
template <class S>
struct weight_vector {
  using scalar_type = S;
  static constexpr bool is_learned = true;
  flat_vector<S>* values;

  index_t num_heads() const { return 1; }
  S operator()(index_t, index_t, index_t) const { return S(0); }
  Eigen::Map<relbias::param_vector<S>> parameters() { return {values->data(), index_t(values->size())}; }
  Eigen::Map<const relbias::param_vector<S>> parameters() const { return {values->data(), index_t(values->size())}; }
};

template <class Bias>
index_t bias_parameter_count(const Bias& bias) {
  if constexpr (relbias::learned_bias<Bias>) return bias.parameters().size();
  else return 0;
}

struct run_config {
  std::string task = "text";  // "text" or "probe"
  std::string scheme = "alibi";
  std::uint64_t seed = 0;
  model_config model;
  index_t steps = 600, batch = 16, seq = 64;
  float learning_rate = 3e-3f;
  index_t eval_every = 50;                              // learning-curve points
  index_t curve_eval_chars = 8192;                      // held-out characters per curve point
  index_t final_eval_chars = 32768;                     // held-out characters per final length
  std::vector<index_t> eval_multiples = {1, 2, 4, 8, 16};
  index_t probe_eval_sequences = 512;
};

struct run_result {
  index_t bias_parameters = 0, model_parameters = 0;
  double ms_per_step = 0;      // wall clock: what a user waits for (on a shared machine, also the others' load)
  double cpu_ms_per_step = 0;  // this process's CPU time: the cost of the step itself (one thread)
  std::vector<double> train_loss;                // nats, every step
  std::vector<double> curve_x, curve_y;          // characters (sequences) seen -> bpc (accuracy)
  std::vector<index_t> eval_lengths;
  std::vector<double> eval_bpc;                  // text: bits per character at each length
  double probe_accuracy = 0;                     // probe: final accuracy
  std::vector<std::vector<double>> bias_by_distance;  // [head][distance]: b(h, i, i - d)
  index_t bias_query_position = 0;
};

/// The model and its bias, trained and evaluated together.
template <class Bias>
class experiment {
 public:
  experiment(const run_config& config, Bias bias) : config_(config), bias_(std::move(bias)), model_(config.model, config.seed) {
    if constexpr (relbias::learned_bias<Bias>) bias_grad_.assign(std::size_t(bias_.parameters().size()), 0.0f);
  }

  float train_step(const batch_tokens& b) {
    const float loss = model_.forward(bias_, b.tokens, b.targets, config_.batch, index_t(b.tokens.size()) / config_.batch);
    std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
    model_.backward(bias_, bias_grad_);
    weight_optimiser_.step(weights_, std::span<const float>(model_.gradient()));
    if constexpr (relbias::learned_bias<Bias>) bias_optimiser_.step(bias_, std::span<const float>(bias_grad_));
    return loss;
  }

  /// Bits per character of stream[0, chars) (+1 for the last target), cut into non-overlapping
  /// windows of length seq: each window's positions see contexts 0 .. seq - 1.
  double bits_per_char(const std::vector<int>& stream, index_t chars, index_t seq) {
    const index_t windows = chars / seq;
    const index_t per_forward = std::max<index_t>(1, 8192 / seq);
    double nats = 0;
    for (index_t first = 0; first < windows; first += per_forward) {
      const index_t count = std::min(per_forward, windows - first);
      const batch_tokens b = consecutive_windows(stream, first, count, seq);
      nats += double(model_.forward(bias_, b.tokens, b.targets, count, seq)) * double(count * seq);
    }
    return nats / double(windows * seq) / std::numbers::ln2;
  }

  /// Fraction of scored probe positions whose most likely token is the target.
  double probe_accuracy(const batch_tokens& b, index_t seq) {
    const index_t count = index_t(b.tokens.size()) / seq;
    model_.forward(bias_, b.tokens, b.targets, count, seq);
    index_t right = 0, scored = 0;
    for (index_t r = 0; r < index_t(b.targets.size()); ++r) {
      if (b.targets[std::size_t(r)] < 0) continue;
      index_t best = 0;
      model_.logits().row(r).maxCoeff(&best);
      right += best == b.targets[std::size_t(r)];
      ++scored;
    }
    return double(right) / double(scored);
  }

  /// b(h, i, i - d) for d = 0 .. i at query position i (FIRE is not shift-invariant past its
  /// threshold, so the position is part of the answer).
  std::vector<std::vector<double>> bias_by_distance(index_t query_position) const {
    std::vector<std::vector<double>> out(std::size_t(bias_.num_heads()));
    for (index_t h = 0; h < bias_.num_heads(); ++h)
      for (index_t d = 0; d <= query_position; ++d) out[std::size_t(h)].push_back(double(bias_(h, query_position, query_position - d)));
    return out;
  }

  const Bias& bias() const { return bias_; }
  model<float, Bias>& network() { return model_; }

 private:
  run_config config_;
  Bias bias_;
  model<float, Bias> model_;
  std::vector<float> bias_grad_;
  weight_vector<float> weights_{&model_.weights()};
  relbias::adam<float> weight_optimiser_{config_.learning_rate};
  relbias::adam<float> bias_optimiser_{config_.learning_rate};
};

/// Trains on the fortunes (corpus) or the probe and evaluates; progress goes to log if given.
template <class Bias>
run_result run(const run_config& config, Bias bias, const text_corpus* corpus) {
  experiment<Bias> e(config, std::move(bias));
  run_result r;
  r.bias_parameters = bias_parameter_count(e.bias());
  r.model_parameters = index_t(e.network().weights().size());
  relbias::detail::random_stream data_rng(config.seed * 0x9E3779B97F4A7C15ull + 1);
  const probe_task probe{config.seq};
  relbias::detail::random_stream probe_eval_rng(0xC0FFEEull);  // the same test sequences for every run
  const batch_tokens probe_eval = probe.sample(config.probe_eval_sequences, probe_eval_rng);
  const bool text = config.task == "text";

  auto evaluate_curve = [&](index_t step) {
    const double seen = double(step * config.batch) * (text ? double(config.seq) : 1.0);
    r.curve_x.push_back(seen);
    r.curve_y.push_back(text ? e.bits_per_char(corpus->held_out, config.curve_eval_chars, config.seq)
                             : e.probe_accuracy(probe_eval, config.seq));
  };
  double train_seconds = 0, train_cpu_seconds = 0;
  for (index_t step = 0; step < config.steps; ++step) {
    if (step % config.eval_every == 0) evaluate_curve(step);
    const batch_tokens b = text ? sample_text(corpus->train, config.batch, config.seq, data_rng)
                                : probe.sample(config.batch, data_rng);
    const auto start = std::chrono::steady_clock::now();
    const std::clock_t cpu_start = std::clock();
    r.train_loss.push_back(double(e.train_step(b)));
    train_cpu_seconds += double(std::clock() - cpu_start) / CLOCKS_PER_SEC;
    train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  evaluate_curve(config.steps);
  r.ms_per_step = 1e3 * train_seconds / double(std::max<index_t>(config.steps, 1));
  r.cpu_ms_per_step = 1e3 * train_cpu_seconds / double(std::max<index_t>(config.steps, 1));

  if (text) {
    for (index_t m : config.eval_multiples) {
      r.eval_lengths.push_back(m * config.seq);
      r.eval_bpc.push_back(e.bits_per_char(corpus->held_out, config.final_eval_chars, m * config.seq));
    }
    r.bias_query_position = config.eval_multiples.back() * config.seq - 1;
  } else {
    r.probe_accuracy = r.curve_y.back();
    r.bias_query_position = config.seq - 1;
  }
  r.bias_by_distance = e.bias_by_distance(r.bias_query_position);
  return r;
}

}  // namespace quality
