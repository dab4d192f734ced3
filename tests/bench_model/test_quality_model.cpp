// The quality benchmark's model (bench/quality): its gradients against finite differences in
// double, and a smoke run of every scheme on a slice of the fortunes.
#include "catch.hpp"

#include "quality/experiment.hpp"

#include <relbias/relbias.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

namespace {

using quality::index_t;

const quality::model_config tiny{.vocab = 6, .d_model = 8, .heads = 2, .layers = 2, .mlp_ratio = 2};
constexpr index_t batch = 2, seq = 7;

// Tokens and targets of a tiny batch; two targets are -1 (not scored), as in the probe.
std::vector<int> tiny_tokens() { return {0, 3, 5, 1, 2, 2, 4, 5, 1, 0, 3, 4, 2, 1}; }
std::vector<int> tiny_targets() { return {3, 5, -1, 2, 2, 4, 0, 1, 0, 3, -1, 2, 1, 5}; }

/// The 5-point central difference (error O(step^4)) of f at x[k], step 1e-4 * max(1, |x[k]|).
template <class F>
double numeric_derivative(double& x, F&& f) {
  const double t = x, step = 1e-4 * std::max(1.0, std::abs(t));
  auto at = [&](double v) {
    x = v;
    return f();
  };
  const double d = (-at(t + 2 * step) + 8 * at(t + step) - 8 * at(t - step) + at(t - 2 * step)) / (12 * step);
  x = t;
  return d;
}

void check_close(double analytic, double numeric, const std::string& what) {
  INFO(what << ": analytic " << analytic << ", numeric " << numeric);
  CHECK(std::abs(analytic - numeric) <= 1e-7 * std::max(std::abs(analytic), 1e-2));
}

/// Every stride-th model weight and every bias parameter against finite differences of the loss.
template <class Bias>
void check_model_gradient(Bias bias, index_t stride) {
  quality::model<double, Bias> m(tiny, 7);
  const std::vector<int> tokens = tiny_tokens(), targets = tiny_targets();
  auto loss = [&] { return m.forward(bias, tokens, targets, batch, seq); };

  std::vector<double> bias_grad;
  if constexpr (relbias::learned_bias<Bias>) bias_grad.assign(std::size_t(bias.parameters().size()), 0.0);
  const double value = loss();
  REQUIRE(std::isfinite(value));
  REQUIRE(value > 0.5);  // not already solved: the gradients are not all tiny
  m.backward(bias, bias_grad);
  const auto analytic = m.gradient();

  for (std::size_t k = 0; k < m.weights().size(); k += std::size_t(stride))
    check_close(analytic[k], numeric_derivative(m.weights()[k], loss), "weight " + std::to_string(k));
  if constexpr (relbias::learned_bias<Bias>) {
    auto theta = bias.parameters();
    for (index_t k = 0; k < theta.size(); ++k)
      check_close(bias_grad[std::size_t(k)], numeric_derivative(theta[k], loss), "bias parameter " + std::to_string(k));
  }
}

}  // namespace

TEST_CASE("quality model: gradients match finite differences for every scheme", "[quality][gradient]") {
  using relbias::masking;
  SECTION("no_bias, every other weight") { check_model_gradient(relbias::no_bias<double>(tiny.heads), 2); }
  SECTION("alibi") { check_model_gradient(relbias::alibi<double>(tiny.heads), 7); }
  SECTION("sandwich") { check_model_gradient(relbias::sandwich<double>(tiny.heads, 4), 7); }
  SECTION("kerple_power") { check_model_gradient(relbias::kerple_power<double>(tiny.heads, 3), 7); }
  SECTION("kerple_log") { check_model_gradient(relbias::kerple_log<double>(tiny.heads, 3), 7); }
  SECTION("t5") {
    relbias::t5<double> t5(tiny.heads, masking::causal, 6, 8);  // buckets 0..2 exact, 3..5 logarithmic: both kinds used
    t5.reset_parameters(3, double(tiny.d_model));
    check_model_gradient(t5, 7);
  }
  SECTION("per_offset, clipped inside the sequence") {
    relbias::per_offset<double> per_offset(tiny.heads, masking::causal, 4);
    per_offset.reset_parameters(3, 0.5);
    check_model_gradient(per_offset, 7);
  }
  SECTION("fire, threshold inside the sequence") {
    check_model_gradient(relbias::fire<double>(tiny.heads, 3, relbias::fire_config{.width = 4, .init_L = 3}), 7);
  }
}

TEST_CASE("quality model: unscored targets add no loss and no gradient", "[quality]") {
  quality::model<double, relbias::alibi<double>> m(tiny, 1);
  const relbias::alibi<double> bias(tiny.heads);
  const std::vector<int> tokens = tiny_tokens();
  std::vector<int> targets(tokens.size(), -1);
  targets[3] = 2;
  std::vector<double> per_position(tokens.size());
  const double loss = m.forward(bias, tokens, targets, batch, seq, per_position);
  CHECK(loss == per_position[3]);
  CHECK(std::count(per_position.begin(), per_position.end(), 0.0) == index_t(tokens.size()) - 1);
  CHECK(loss == Approx(std::log(double(tiny.vocab))).epsilon(0.05));  // N(0, 0.02) logits: nearly uniform
}

TEST_CASE("quality model: every scheme's held-out loss drops and stays finite on a slice of the fortunes",
          "[quality][smoke]") {
  // Every 50th training record (about 47 K characters); 2 K held-out characters.
  static const quality::text_corpus corpus = quality::read_fortunes("/usr/share/games/fortunes", 50);
  quality::run_config config;
  config.model = {.vocab = quality::text_vocab, .d_model = 16, .heads = 2, .layers = 1, .mlp_ratio = 2};
  config.batch = 8, config.seq = 16, config.learning_rate = 1e-2f;
  constexpr index_t steps = 40, held_out_chars = 2048;

  for (const std::string& scheme : quality::scheme_names) {
    INFO("scheme " << scheme);
    config.scheme = scheme;
    quality::with_scheme(scheme, config.model.heads, config.seq, config.model.d_model, 0, [&](auto bias) {
      quality::experiment e(config, std::move(bias));
      const double before = e.bits_per_char(corpus.held_out, held_out_chars, config.seq);
      relbias::detail::random_stream data_order(1);
      for (index_t step = 0; step < steps; ++step) {
        const float loss =
            e.train_step(quality::sample_text(corpus.train, config.batch, config.seq, data_order), config.learning_rate);
        REQUIRE(std::isfinite(loss));
      }
      const double after = e.bits_per_char(corpus.held_out, held_out_chars, config.seq);
      const double after_long = e.bits_per_char(corpus.held_out, held_out_chars, 4 * config.seq);
      CHECK(before == Approx(std::log2(double(quality::text_vocab))).epsilon(0.05));  // uniform at the start
      CHECK(after < before - 1.5);  // 6.6 bits -> below 5.1: it learned character frequencies at least
      CHECK(std::isfinite(after_long));
      CHECK(after_long < before);
    });
  }
}

TEST_CASE("quality model: GELU in Eigen's float packets matches the tanh formula in double", "[quality]") {
  quality::matrix<float> x(3, 37);  // 37 columns: full packets and a remainder
  for (index_t r = 0; r < x.rows(); ++r)
    for (index_t c = 0; c < x.cols(); ++c) x(r, c) = -6.0f + 12.0f * float(r * x.cols() + c) / float(x.size());
  quality::matrix<float> activation, derivative;
  quality::gelu(x, activation, derivative);
  for (index_t r = 0; r < x.rows(); ++r)
    for (index_t c = 0; c < x.cols(); ++c) {
      const double u = x(r, c), k = 0.7978845608028654, a = 0.044715;
      const double t = std::tanh(k * (u + a * u * u * u));
      const double slope = 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * k * (1 + 3 * a * u * u);
      // Where tanh nears -1 (x < -3), 1 + t cancels in float, whichever tanh computes t: an
      // absolute error of a few 1e-6 on activations and slopes near 0.
      CHECK(activation(r, c) == Approx(0.5 * u * (1 + t)).margin(2e-5).epsilon(1e-5));
      CHECK(derivative(r, c) == Approx(slope).margin(2e-5).epsilon(1e-5));
    }
}

TEST_CASE("quality benchmark: warm-up then cosine decay, the same for every scheme", "[quality]") {
  quality::run_config c;
  c.steps = 1000, c.learning_rate = 1e-2f, c.warmup_fraction = 0.05f, c.final_lr_fraction = 0.1f;
  CHECK(quality::scheduled_learning_rate(c, 0) == Approx(1e-2 / 50));   // warm-up: 50 steps, linear
  CHECK(quality::scheduled_learning_rate(c, 49) == Approx(1e-2));
  CHECK(quality::scheduled_learning_rate(c, 50) == Approx(1e-2));       // the cosine starts at the peak
  CHECK(quality::scheduled_learning_rate(c, 525) == Approx(0.55e-2));   // halfway: the mean of peak and floor
  CHECK(quality::scheduled_learning_rate(c, 1000) == Approx(1e-3));     // the floor, 10 % of the peak
}

TEST_CASE("quality benchmark: validation from the held-out tail, test from its head, apart when they fit",
          "[quality]") {
  quality::run_config c;  // curve 8192, final 32768, longest length 16 x 64
  std::vector<int> held_out(50000);
  std::iota(held_out.begin(), held_out.end(), 0);
  quality::held_out_slices s = quality::slice_held_out(held_out, c);
  CHECK(s.validation.size() == 8193);
  CHECK(s.validation.back() == 49999);
  CHECK(s.test.size() == 32769);
  CHECK(s.test.front() == 0);
  CHECK_FALSE(s.overlap);

  held_out.resize(9000);  // too short for both: the test slice overlaps the validation slice
  s = quality::slice_held_out(held_out, c);
  CHECK(s.overlap);
  CHECK(s.test.size() == 9000);
}
