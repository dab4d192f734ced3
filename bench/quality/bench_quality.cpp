// bench_quality: one training run of the quality benchmark, written as JSON.
//
//   bench_quality --task text|probe --scheme NAME --seed N --out FILE
//                 [--steps N] [--batch N] [--seq N] [--lr X] [--keep-every N] [--eval-every N]
//                 [--curve-eval-chars N] [--final-eval-chars N] [--fortunes DIR]
//
// text: a character model of Debian's fortunes (held-out files: see data.hpp), bits per
// character at 1, 2, 4, 8, 16 x the training length. probe: copy the symbol k = 5..9 back.
// scripts/bench-quality.sh runs every scheme and seed; bench/quality/report.py makes the tables.

#include "fma_peak.hpp"
#include "quality/experiment.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>

namespace {

using quality::index_t;

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", x);
  return text;
}

template <class Range>
std::string json_array(const Range& values) {
  std::string s = "[";
  for (const auto& v : values) {
    if (s.size() > 1) s += ',';
    s += json_number(double(v));
  }
  return s + "]";
}

std::string json_strings(const std::vector<std::string>& values) {
  std::string s = "[";
  for (const auto& v : values) {
    if (s.size() > 1) s += ',';
    s += '"';
    s += v;
    s += '"';
  }
  return s + "]";
}

void write_json(const std::string& path, const quality::run_config& c, const quality::run_result& r,
                const quality::text_corpus* corpus, index_t keep_every, double peak_gflops) {
  const double step_gflops = r.flops_per_step / (r.cpu_ms_per_step * 1e6);
  std::ostringstream o;
  o << "{\n \"task\": \"" << c.task << "\", \"scheme\": \"" << c.scheme << "\", \"seed\": " << c.seed
    << ",\n \"steps\": " << c.steps << ", \"batch\": " << c.batch << ", \"seq\": " << c.seq
    << ", \"learning_rate\": " << json_number(c.learning_rate) << ", \"keep_every\": " << keep_every
    << ",\n \"d_model\": " << c.model.d_model << ", \"heads\": " << c.model.heads << ", \"layers\": " << c.model.layers
    << ", \"vocab\": " << c.model.vocab << ",\n \"bias_parameters\": " << r.bias_parameters
    << ", \"model_parameters\": " << r.model_parameters << ", \"ms_per_step\": " << json_number(r.ms_per_step)
    << ", \"cpu_ms_per_step\": " << json_number(r.cpu_ms_per_step) << ",\n \"steps_run\": " << r.steps_run
    << ", \"warmup_fraction\": " << json_number(c.warmup_fraction) << ", \"final_lr_fraction\": " << json_number(c.final_lr_fraction)
    << ",\n \"flops_per_step\": " << json_number(r.flops_per_step) << ", \"step_gflops\": " << json_number(step_gflops)
    << ", \"fma_peak_gflops_1_thread\": " << json_number(peak_gflops)
    << ", \"peak_fraction\": " << json_number(step_gflops / peak_gflops) << ",\n \"best_x\": " << json_number(r.best_x)
    << ", \"validation_overlaps_test\": " << (r.validation_overlaps_test ? "true" : "false");
  if (corpus)
    o << ",\n \"train_chars\": " << corpus->train.size() << ", \"held_out_chars\": " << corpus->held_out.size()
      << ",\n \"held_out_files\": " << json_strings(corpus->held_out_files)
      << ",\n \"final_eval_chars\": " << c.final_eval_chars << ", \"curve_eval_chars\": " << c.curve_eval_chars;
  o << ",\n \"eval_lengths\": " << json_array(r.eval_lengths) << ",\n \"eval_bpc\": " << json_array(r.eval_bpc)
    << ",\n \"probe_accuracy\": " << json_number(r.probe_accuracy) << ",\n \"curve_x\": " << json_array(r.curve_x)
    << ",\n \"curve_y\": " << json_array(r.curve_y) << ",\n \"train_loss\": " << json_array(r.train_loss)
    << ",\n \"learning_rate_schedule\": " << json_array(r.learning_rate)
    << ",\n \"bias_query_position\": " << r.bias_query_position << ",\n \"bias_by_distance\": [";
  for (std::size_t h = 0; h < r.bias_by_distance.size(); ++h) o << (h ? ",\n  " : "\n  ") << json_array(r.bias_by_distance[h]);
  o << "]\n}\n";
  std::ofstream(path) << o.str();
}

}  // namespace

int main(int argc, char** argv) try {
  std::map<std::string, std::string> args;
  for (int n = 1; n + 1 < argc; n += 2) args[argv[n]] = argv[n + 1];
  auto get = [&](const std::string& key, const std::string& fallback) { return args.contains(key) ? args[key] : fallback; };
  auto get_int = [&](const std::string& key, index_t fallback) { return index_t(std::stoll(get(key, std::to_string(fallback)))); };

  quality::run_config c;
  c.task = get("--task", "text");
  c.scheme = get("--scheme", "alibi");
  c.seed = std::uint64_t(get_int("--seed", 0));
  c.steps = get_int("--steps", c.steps);
  c.batch = get_int("--batch", c.batch);
  c.seq = get_int("--seq", c.task == "probe" ? 32 : c.seq);
  c.eval_every = get_int("--eval-every", c.eval_every);
  c.learning_rate = std::stof(get("--lr", std::to_string(c.learning_rate)));
  c.curve_eval_chars = get_int("--curve-eval-chars", c.curve_eval_chars);
  c.final_eval_chars = get_int("--final-eval-chars", c.final_eval_chars);
  const index_t keep_every = get_int("--keep-every", 1);
  const std::string out = get("--out", "");
  if (out.empty() || (c.task != "text" && c.task != "probe"))
    throw std::invalid_argument("usage: bench_quality --task text|probe --scheme NAME --seed N --out FILE [...]");

  std::optional<quality::text_corpus> corpus;
  if (c.task == "text") {
    corpus = quality::read_fortunes(get("--fortunes", "/usr/share/games/fortunes"), keep_every);
    c.model.vocab = quality::text_vocab;
  } else {
    c.model.vocab = quality::probe_task::symbols * (quality::probe_task::max_k - quality::probe_task::min_k + 1);
  }
  // The one-thread FMA peak of this core, now, so the step's GFLOP/s reads as a fraction of it.
  const double peak_gflops = relbias_bench::probe_fma_gflops(1);
  const quality::run_result r = quality::with_scheme(c.scheme, c.model.heads, c.seq, c.model.d_model, c.seed, [&](auto bias) {
    return quality::run(c, std::move(bias), corpus ? &*corpus : nullptr);
  });
  write_json(out, c, r, corpus ? &*corpus : nullptr, keep_every, peak_gflops);
  std::printf("%s %s seed %llu: %lld steps, %.1f ms/step (%.1f ms CPU, %.0f GFLOP/s, %.2f of the FMA peak), final train loss %.3f nats, %s %.3f\n", c.task.c_str(), c.scheme.c_str(),
              static_cast<unsigned long long>(c.seed), static_cast<long long>(r.steps_run), r.ms_per_step, r.cpu_ms_per_step,
              r.flops_per_step / (r.cpu_ms_per_step * 1e6), r.flops_per_step / (r.cpu_ms_per_step * 1e6) / peak_gflops, r.train_loss.back(),
              c.task == "text" ? "held-out bpc at 1x" : "probe accuracy", c.task == "text" ? r.eval_bpc.front() : r.probe_accuracy);
  return 0;
} catch (const std::exception& error) {
  std::fprintf(stderr, "bench_quality: %s\n", error.what());
  return 1;
}
