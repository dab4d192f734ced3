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
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace quality {

inline const std::vector<std::string> scheme_names = {"no_bias",    "alibi", "sandwich", "kerple_power", "kerple_log",
                                                      "t5",         "per_offset", "fire", "fire_train_L"};

/// Calls fn(policy) with the scheme's policy (float, causal, H heads), initialised as its
/// reference does: T5 HF's normal(0, d_model^-0.5), per-offset zeros clipped at the training
/// length, KERPLE and FIRE their reference draws. "fire" keeps the reference threshold init_L = 512
/// (cramming's FIRE; far above the training length, so the normaliser is constant while training
/// and its progressive interpolation only acts past 512); "fire_train_L" sets init_L to the
/// training length, as the FIRE paper pairs the threshold with the length it trains at.
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
  if (name == "fire_train_L") return fn(relbias::fire<float>(heads, seed, {.init_L = double(train_length)}));
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
  // 16 windows a step, Adam's beta2 0.99 (nanoGPT's small character model): seed 0, 4.1 M
  // characters, test bpc at 1x against 32 windows and beta2 0.999 at the same CPU time: T5 2.75 ->
  // 2.70, KERPLE power 2.84 -> 2.74, ALiBi 2.93 -> 2.89 (bench/README.md, "Why this model").
  index_t steps = 4000, batch = 16, seq = 64;
  float learning_rate = 1.2e-2f;                        // the schedule's peak (d_model 32: 0.012 beat 0.006; the probe: --lr 0.006)
  float warmup_fraction = 0.05f;                        // linear warm-up over this part of the steps
  float final_lr_fraction = 0.1f;                       // cosine decay down to this part of the peak
  float beta2 = 0.99f;                                  // Adam's second-moment decay (why 0.99: above the batch)
  index_t eval_every = 50;                              // learning-curve points
  index_t curve_eval_chars = 8192;                      // validation characters per curve point
  index_t final_eval_chars = 32768;                     // test characters per final length
  std::vector<index_t> eval_multiples = {1, 2, 4, 8, 16};
  index_t probe_eval_sequences = 512;
  double probe_solved_accuracy = 0.99;                  // the probe stops after two curve points at or above
};

/// The schedule a small model trains with (nanoGPT's): linear warm-up, then a cosine from the
/// peak rate down to final_lr_fraction of it at the last step. The same for every scheme.
inline float scheduled_learning_rate(const run_config& c, index_t step) {
  const index_t warmup = std::max<index_t>(1, index_t(double(c.warmup_fraction) * double(c.steps)));
  if (step < warmup) return c.learning_rate * float(step + 1) / float(warmup);
  const double progress = double(step - warmup) / double(std::max<index_t>(1, c.steps - warmup));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * std::min(progress, 1.0)));
  return float(double(c.learning_rate) * (double(c.final_lr_fraction) + (1.0 - double(c.final_lr_fraction)) * cosine));
}

/// FLOPs of one training step (forward, backward), 2 per multiply-add, counting the model's
/// matrix products and the attention products over the keys each query sees (causal: seq(seq+1)/2
/// pairs); the backward does twice the forward's products, the attention backward 5 of its 2
/// (it recomputes Q K^T). Elementwise work (norms, GELU, softmax, Adam) is not counted.
inline double training_flops_per_step(const model_config& m, index_t batch, index_t seq) {
  const double tokens = double(batch * seq), d = double(m.d_model);
  const double per_token_forward = 2.0 * double(m.layers) * (4.0 * d * d + 2.0 * d * double(m.hidden())) + 2.0 * d * double(m.vocab);
  const double pairs = double(batch) * double(seq) * double(seq + 1) / 2.0;
  const double attention_forward = 2.0 * 2.0 * pairs * double(m.head_dim()) * double(m.heads) * double(m.layers);
  return 3.0 * per_token_forward * tokens + 3.5 * attention_forward;
}

struct run_result {
  index_t bias_parameters = 0, model_parameters = 0;
  index_t steps_run = 0;       // the probe stops early once solved
  double ms_per_step = 0;      // wall clock: what a user waits for (on a shared machine, also the others' load)
  double cpu_ms_per_step = 0;  // this process's CPU time: the cost of the step itself (one thread)
  double flops_per_step = 0;   // training_flops_per_step
  std::vector<double> learning_rate;             // every step
  std::vector<double> train_loss;                // nats, every step
  std::vector<double> curve_x, curve_y;          // characters (sequences) seen -> validation bpc (accuracy)
  double best_x = 0;                             // where the curve was best: the weights evaluated at the end
  bool validation_overlaps_test = false;         // held-out text too short for separate slices
  std::vector<index_t> eval_lengths;
  std::vector<double> eval_bpc;                  // text: bits per character at each length
  std::vector<index_t> eval_scored_chars;        // text: characters scored at each length (whole windows)
  double probe_accuracy = 0;                     // probe: the best weights' accuracy on the test sequences
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

  float train_step(const batch_tokens& b, float learning_rate) {
    const float loss = model_.forward(bias_, b.tokens, b.targets, config_.batch, index_t(b.tokens.size()) / config_.batch);
    std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
    model_.backward(bias_, bias_grad_);
    weight_optimiser_.set_learning_rate(learning_rate);
    weight_optimiser_.step(weights_, std::span<const float>(model_.gradient()));
    if constexpr (relbias::learned_bias<Bias>) {
      bias_optimiser_.set_learning_rate(learning_rate);
      bias_optimiser_.step(bias_, std::span<const float>(bias_grad_));
    }
    return loss;
  }

  /// Bits per character of stream[0, chars) (+1 for the last target), cut into non-overlapping
  /// windows of length seq: each window's positions see contexts 0 .. seq - 1.
  double bits_per_char(std::span<const int> stream, index_t chars, index_t seq) {
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

  /// The weights and bias of the best curve point, evaluated at the end (early stopping: on little
  /// data the held-out loss turns up before the schedule ends).
  struct snapshot {
    flat_vector<float> weights;
    Bias bias;
  };
  snapshot save() { return {model_.weights(), bias_}; }
  void restore(const snapshot& s) {
    model_.weights() = s.weights;
    bias_ = s.bias;
  }

  const Bias& bias() const { return bias_; }
  model<float, Bias>& network() { return model_; }

 private:
  run_config config_;
  Bias bias_;
  model<float, Bias> model_;
  std::vector<float> bias_grad_;
  weight_vector<float> weights_{&model_.weights()};
  relbias::adam_options<float> adam_options_{.learning_rate = config_.learning_rate, .beta2 = config_.beta2};
  relbias::adam<float> weight_optimiser_{adam_options_};
  relbias::adam<float> bias_optimiser_{adam_options_};
};

/// The held-out text cut in two: validation (the learning curve and the choice of the best
/// weights) from its tail, test (the final numbers) from its head, apart when it is long enough.
struct held_out_slices {
  std::span<const int> validation, test;
  bool overlap = false;
};
inline held_out_slices slice_held_out(const std::vector<int>& held_out, const run_config& c) {
  const index_t size = index_t(held_out.size());
  const index_t validation = std::min(c.curve_eval_chars + 1, size);
  held_out_slices s;
  s.validation = std::span<const int>(held_out).last(std::size_t(validation));
  const index_t longest = c.eval_multiples.back() * c.seq + 1;
  const index_t test = std::min(c.final_eval_chars + 1, size - validation);
  s.overlap = test < longest;
  s.test = s.overlap ? std::span<const int>(held_out).first(std::size_t(std::min(c.final_eval_chars + 1, size)))
                     : std::span<const int>(held_out).first(std::size_t(test));
  return s;
}

/// Trains on the text (corpus) or the probe and evaluates the best weights.
template <class Bias>
run_result run(const run_config& config, Bias bias, const text_corpus* corpus) {
  experiment<Bias> e(config, std::move(bias));
  run_result r;
  r.bias_parameters = bias_parameter_count(e.bias());
  r.model_parameters = index_t(e.network().weights().size());
  r.flops_per_step = training_flops_per_step(config.model, config.batch, config.seq);
  relbias::detail::random_stream data_rng(config.seed * 0x9E3779B97F4A7C15ull + 1);
  const probe_task probe{config.seq};
  // The same sequences for every run: validation for the curve and the choice of the weights,
  // test (drawn apart) for the final accuracy, so the choice does not inflate the number reported.
  relbias::detail::random_stream probe_validation_rng(0xC0FFEEull), probe_test_rng(0x7E57ull);
  const batch_tokens probe_eval = probe.sample(config.probe_eval_sequences, probe_validation_rng);
  const batch_tokens probe_test = probe.sample(config.probe_eval_sequences, probe_test_rng);
  const bool text = config.task == "text";
  held_out_slices slices;
  if (text) slices = slice_held_out(corpus->held_out, config);
  r.validation_overlaps_test = slices.overlap;

  // Higher is better for the probe's accuracy, lower for bits per character.
  auto better = [&](double a, double b) { return text ? a < b : a > b; };
  std::optional<typename experiment<Bias>::snapshot> best;
  index_t solved_points = 0;
  auto evaluate_curve = [&](index_t step) {
    const double seen = double(step * config.batch) * (text ? double(config.seq) : 1.0);
    const double y = text ? e.bits_per_char(slices.validation, index_t(slices.validation.size()) - 1, config.seq)
                          : e.probe_accuracy(probe_eval, config.seq);
    if (r.curve_y.empty() || better(y, text ? *std::min_element(r.curve_y.begin(), r.curve_y.end())
                                            : *std::max_element(r.curve_y.begin(), r.curve_y.end()))) {
      best = e.save();
      r.best_x = seen;
    }
    r.curve_x.push_back(seen);
    r.curve_y.push_back(y);
    solved_points = !text && y >= config.probe_solved_accuracy ? solved_points + 1 : 0;
  };
  double train_seconds = 0, train_cpu_seconds = 0;
  index_t step = 0;
  for (; step < config.steps; ++step) {
    if (step % config.eval_every == 0) evaluate_curve(step);
    if (solved_points >= 2) break;  // solved: two curve points in a row at or above the target
    const batch_tokens b = text ? sample_text(corpus->train, config.batch, config.seq, data_rng)
                                : probe.sample(config.batch, data_rng);
    const float learning_rate = scheduled_learning_rate(config, step);
    const auto start = std::chrono::steady_clock::now();
    const std::clock_t cpu_start = std::clock();
    r.train_loss.push_back(double(e.train_step(b, learning_rate)));
    train_cpu_seconds += double(std::clock() - cpu_start) / CLOCKS_PER_SEC;
    train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.learning_rate.push_back(double(learning_rate));
  }
  if (solved_points < 2) evaluate_curve(step);
  r.steps_run = step;
  r.ms_per_step = 1e3 * train_seconds / double(std::max<index_t>(step, 1));
  r.cpu_ms_per_step = 1e3 * train_cpu_seconds / double(std::max<index_t>(step, 1));

  e.restore(*best);
  if (text) {
    for (index_t m : config.eval_multiples) {
      r.eval_lengths.push_back(m * config.seq);
      r.eval_bpc.push_back(e.bits_per_char(slices.test, index_t(slices.test.size()) - 1, m * config.seq));
      r.eval_scored_chars.push_back(scored_tokens(index_t(slices.test.size()), config.final_eval_chars, m * config.seq));
    }
    r.bias_query_position = config.eval_multiples.back() * config.seq - 1;
  } else {
    r.probe_accuracy = e.probe_accuracy(probe_test, config.seq);
    r.bias_query_position = config.seq - 1;
  }
  r.bias_by_distance = e.bias_by_distance(r.bias_query_position);
  return r;
}

}  // namespace quality
