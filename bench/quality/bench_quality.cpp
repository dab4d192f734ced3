// bench_quality: one training run of the quality benchmark, written as JSON.
//
//   bench_quality --task text|probe --scheme NAME --seed N --out FILE
//                 [--steps N] [--batch N] [--seq N] [--lr X] [--beta2 X] [--keep-every N] [--eval-every N]
//                 [--curve-eval-chars N] [--final-eval-chars N] [--fortunes DIR]
//                 [--corpus PATH ...] [--held-out FILE ... | --held-out-fraction X] [--check]
//
// text: a character model of Debian's fortunes (held-out files: see data.hpp), bits per
// character at 1, 2, 4, 8, 16 x the training length. probe: copy the symbol k = 5..9 back.
// scripts/bench-quality.sh runs every scheme and seed; bench/quality/report.py makes the tables.
//
// Your own text instead of the fortunes: --corpus PATH (repeatable; a file, or a directory read
// recursively) is read as bytes, vocabulary 256. Held out: the files named by --held-out FILE
// (repeatable), or else whole files from the end of the corpus order until --held-out-fraction
// (default 0.1) of the bytes, always leaving a training file; a single file holds out its tail.
// --keep-every N keeps every N-th 1 KiB block of the training bytes (the small-data runs).
// --check reads and splits the corpus, prints what it read, and exits. Flags given twice: the
// last counts, except --corpus and --held-out, which accumulate. Errors: message, exit status 1.

#include "fma_peak.hpp"
#include "quality/experiment.hpp"

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

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

// Paths may hold quotes, backslashes and control bytes.
std::string json_string(const std::string& value) {
  std::string s = "\"";
  for (unsigned char c : value) {
    if (c == '"' || c == '\\') s += '\\';
    if (c < 0x20) {
      char escape[8];
      std::snprintf(escape, sizeof escape, "\\u%04x", unsigned(c));
      s += escape;
    } else {
      s += char(c);
    }
  }
  return s + '"';
}

std::string json_strings(const std::vector<std::string>& values) {
  std::string s = "[";
  for (const auto& v : values) {
    if (s.size() > 1) s += ',';
    s += json_string(v);
  }
  return s + "]";
}

/// The command line: --flag value pairs, and the switch --check. A flag given twice: the last
/// value counts (so run.py's caller can override a default after "--"), except for the
/// repeatable flags read with all(). Every flag given must be read (check_all_read): a misspelt
/// one is an error, not silently ignored.
class arguments {
 public:
  arguments(int argc, char** argv) {
    for (int n = 1; n < argc; ++n) {
      const std::string flag = argv[n];
      if (!flag.starts_with("--")) throw std::invalid_argument("expected a --flag, got '" + flag + "'");
      if (flag == "--check") {
        values_[flag].push_back("1");
        continue;
      }
      if (n + 1 == argc) throw std::invalid_argument(flag + " needs a value");
      values_[flag].push_back(argv[++n]);
    }
  }
  std::vector<std::string> all(const std::string& flag) {
    read_.insert(flag);
    const auto found = values_.find(flag);
    return found == values_.end() ? std::vector<std::string>{} : found->second;
  }
  std::string get(const std::string& flag, const std::string& fallback) {
    const std::vector<std::string> values = all(flag);
    return values.empty() ? fallback : values.back();
  }
  bool has(const std::string& flag) { return !all(flag).empty(); }
  index_t get_int(const std::string& flag, index_t fallback) { return parse<index_t>(flag, get(flag, std::to_string(fallback))); }
  double get_number(const std::string& flag, double fallback) { return parse<double>(flag, get(flag, std::to_string(fallback))); }
  void check_all_read() const {
    for (const auto& [flag, values] : values_)
      if (!read_.contains(flag)) throw std::invalid_argument("unknown flag " + flag);
  }

 private:
  template <class T>
  static T parse(const std::string& flag, const std::string& text) {
    T value{};
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size())
      throw std::invalid_argument(flag + " expects a number, got '" + text + "'");
    return value;
  }
  std::map<std::string, std::vector<std::string>> values_;
  std::set<std::string> read_;
};

/// The corpus of a text run: the fortunes unless --corpus is given; checked against the longest
/// evaluation length, with the evaluation lengths clamped to what the held-out part holds.
quality::text_corpus load_corpus(arguments& args, quality::run_config& c, index_t keep_every) {
  const std::vector<std::string> roots = args.all("--corpus");
  quality::corpus_options options;
  options.held_out = args.all("--held-out");
  options.held_out_fraction = args.get_number("--held-out-fraction", options.held_out_fraction);
  options.keep_every = keep_every;
  const std::string fortunes = args.get("--fortunes", "/usr/share/games/fortunes");
  if (roots.empty() && (!options.held_out.empty() || args.has("--held-out-fraction")))
    throw std::invalid_argument("--held-out and --held-out-fraction apply to a --corpus (the fortunes hold out literature, science, wisdom)");
  if (keep_every < 1) throw std::invalid_argument("--keep-every must be >= 1, got " + std::to_string(keep_every));
  if (!options.held_out.empty() && args.has("--held-out-fraction"))
    throw std::invalid_argument("give --held-out or --held-out-fraction, not both");
  quality::text_corpus corpus = roots.empty() ? quality::read_fortunes(fortunes, keep_every) : quality::read_corpus(roots, options);
  const index_t longest = *std::max_element(c.eval_multiples.begin(), c.eval_multiples.end()) * c.seq;
  quality::check_lengths(corpus, c.seq, longest, keep_every);
  c.model.vocab = corpus.vocab;
  c.final_eval_chars = std::min(c.final_eval_chars, index_t(corpus.held_out.size()) - 1);
  c.curve_eval_chars = std::min(c.curve_eval_chars, index_t(corpus.held_out.size()) - 1);
  return corpus;
}

/// What was read, for the run's log (the JSON has the same).
void describe(const quality::text_corpus& corpus, bool every_file) {
  std::printf("corpus: %ju bytes, vocabulary %lld; training %zu tokens, held out %zu tokens (%s)\n", corpus.corpus_bytes,
              static_cast<long long>(corpus.vocab), corpus.train.size(), corpus.held_out.size(), corpus.split.c_str());
  if (!every_file) return;
  for (const std::string& f : corpus.train_files) std::printf("  train     %s\n", f.c_str());
  for (const std::string& f : corpus.held_out_files) std::printf("  held out  %s\n", f.c_str());
}

/// The training step's useful GFLOP/s (training_flops_per_step over its CPU time).
double step_gflops(const quality::run_result& r) { return r.flops_per_step / (r.cpu_ms_per_step * 1e6); }

void write_json(const std::string& path, const quality::run_config& c, const quality::run_result& r,
                const quality::text_corpus* corpus, const std::vector<std::string>& corpus_paths, index_t keep_every,
                double peak_gflops) {
  std::ostringstream o;
  o << "{\n \"task\": \"" << c.task << "\", \"scheme\": \"" << c.scheme << "\", \"seed\": " << c.seed
    << ",\n \"steps\": " << c.steps << ", \"batch\": " << c.batch << ", \"seq\": " << c.seq
    << ", \"learning_rate\": " << json_number(c.learning_rate) << ", \"keep_every\": " << keep_every
    << ",\n \"d_model\": " << c.model.d_model << ", \"heads\": " << c.model.heads << ", \"layers\": " << c.model.layers
    << ", \"vocab\": " << c.model.vocab << ",\n \"bias_parameters\": " << r.bias_parameters
    << ", \"model_parameters\": " << r.model_parameters << ", \"ms_per_step\": " << json_number(r.ms_per_step)
    << ", \"cpu_ms_per_step\": " << json_number(r.cpu_ms_per_step) << ",\n \"steps_run\": " << r.steps_run
    << ", \"warmup_fraction\": " << json_number(c.warmup_fraction) << ", \"final_lr_fraction\": " << json_number(c.final_lr_fraction)
    << ", \"beta2\": " << json_number(c.beta2)
    << ",\n \"flops_per_step\": " << json_number(r.flops_per_step) << ", \"step_gflops\": " << json_number(step_gflops(r))
    << ", \"fma_peak_gflops_1_thread\": " << json_number(peak_gflops)
    << ", \"peak_fraction\": " << json_number(step_gflops(r) / peak_gflops) << ",\n \"best_x\": " << json_number(r.best_x)
    << ", \"validation_overlaps_test\": " << (r.validation_overlaps_test ? "true" : "false");
  if (corpus)
    o << ",\n \"train_chars\": " << corpus->train.size() << ", \"held_out_chars\": " << corpus->held_out.size()
      << ",\n \"held_out_files\": " << json_strings(corpus->held_out_files)
      << ",\n \"final_eval_chars\": " << c.final_eval_chars << ", \"curve_eval_chars\": " << c.curve_eval_chars;
  if (corpus)
    o << ",\n \"corpus\": " << json_strings(corpus_paths) << ", \"corpus_bytes\": " << corpus->corpus_bytes
      << ", \"split\": " << json_string(corpus->split) << ",\n \"train_files\": " << json_strings(corpus->train_files)
      << ",\n \"eval_scored_chars\": " << json_array(r.eval_scored_chars);
  o << ",\n \"eval_lengths\": " << json_array(r.eval_lengths) << ",\n \"eval_bpc\": " << json_array(r.eval_bpc)
    << ",\n \"probe_accuracy\": " << json_number(r.probe_accuracy) << ",\n \"curve_x\": " << json_array(r.curve_x)
    << ",\n \"curve_y\": " << json_array(r.curve_y) << ",\n \"train_loss\": " << json_array(r.train_loss)
    << ",\n \"learning_rate_schedule\": " << json_array(r.learning_rate)
    << ",\n \"bias_query_position\": " << r.bias_query_position << ",\n \"bias_by_distance\": [";
  for (std::size_t h = 0; h < r.bias_by_distance.size(); ++h) o << (h ? ",\n  " : "\n  ") << json_array(r.bias_by_distance[h]);
  o << "]\n}\n";
  std::ofstream(path) << o.str();
}

/// The model's shape from the command line: sizes positive, heads dividing d_model.
void check_model(const quality::model_config& m) {
  if (m.d_model < 1 || m.heads < 1 || m.layers < 1 || m.mlp_ratio < 1)
    throw std::invalid_argument("--d-model, --heads, --layers and --mlp-ratio must be >= 1, got " + std::to_string(m.d_model) + ", " +
                                std::to_string(m.heads) + ", " + std::to_string(m.layers) + ", " + std::to_string(m.mlp_ratio));
  if (m.d_model % m.heads != 0)
    throw std::invalid_argument("--heads = " + std::to_string(m.heads) + " must divide --d-model = " + std::to_string(m.d_model));
}

}  // namespace

int main(int argc, char** argv) try {
  arguments args(argc, argv);
  quality::run_config c;
  c.task = args.get("--task", "text");
  c.scheme = args.get("--scheme", "alibi");
  c.seed = std::uint64_t(args.get_int("--seed", 0));
  c.steps = args.get_int("--steps", c.steps);
  c.batch = args.get_int("--batch", c.batch);
  c.seq = args.get_int("--seq", c.task == "probe" ? 32 : c.seq);
  c.eval_every = args.get_int("--eval-every", c.eval_every);
  c.learning_rate = float(args.get_number("--lr", double(c.learning_rate)));
  c.beta2 = float(args.get_number("--beta2", double(c.beta2)));
  c.curve_eval_chars = args.get_int("--curve-eval-chars", c.curve_eval_chars);
  c.final_eval_chars = args.get_int("--final-eval-chars", c.final_eval_chars);
  c.model.d_model = args.get_int("--d-model", c.model.d_model);
  c.model.heads = args.get_int("--heads", c.model.heads);
  c.model.layers = args.get_int("--layers", c.model.layers);
  c.model.mlp_ratio = args.get_int("--mlp-ratio", c.model.mlp_ratio);
  check_model(c.model);
  const index_t keep_every = args.get_int("--keep-every", 1);
  const std::string out = args.get("--out", "");
  const bool check_only = args.has("--check");
  if ((out.empty() && !check_only) || (c.task != "text" && c.task != "probe"))
    throw std::invalid_argument("usage: bench_quality --task text|probe --scheme NAME --seed N --out FILE [...]");
  if (c.task == "probe" && (args.has("--corpus") || args.has("--held-out") || args.has("--held-out-fraction")))
    throw std::invalid_argument("--corpus, --held-out and --held-out-fraction apply to --task text");

  std::optional<quality::text_corpus> corpus;
  if (c.task == "text") {
    corpus = load_corpus(args, c, keep_every);
  } else {
    c.model.vocab = quality::probe_task::symbols * (quality::probe_task::max_k - quality::probe_task::min_k + 1);
  }
  args.check_all_read();
  if (corpus) describe(*corpus, args.has("--corpus"));
  if (check_only) return 0;
  // The one-thread FMA peak of this core per CPU second, as the step's GFLOP/s is, so the
  // fraction holds when other runs share the machine.
  const double peak_gflops = relbias_bench::probe_fma_gflops_cpu_time();
  const quality::run_result r = quality::with_scheme(c.scheme, c.model.heads, c.seq, c.model.d_model, c.seed, [&](auto bias) {
    return quality::run(c, std::move(bias), corpus ? &*corpus : nullptr);
  });
  const std::vector<std::string> corpus_paths =
      args.has("--corpus") ? args.all("--corpus") : std::vector<std::string>{args.get("--fortunes", "/usr/share/games/fortunes")};
  write_json(out, c, r, corpus ? &*corpus : nullptr, corpus_paths, keep_every, peak_gflops);
  std::printf("%s %s seed %llu: %lld steps, %.1f ms/step (%.1f ms CPU, %.0f GFLOP/s, %.2f of the FMA peak), final train loss %.3f nats, %s %.3f\n",
              c.task.c_str(), c.scheme.c_str(), static_cast<unsigned long long>(c.seed), static_cast<long long>(r.steps_run),
              r.ms_per_step, r.cpu_ms_per_step, step_gflops(r), step_gflops(r) / peak_gflops, r.train_loss.back(),
              c.task == "text" ? "held-out bpc at 1x" : "probe accuracy", c.task == "text" ? r.eval_bpc.front() : r.probe_accuracy);
  return 0;
} catch (const std::exception& error) {
  std::fprintf(stderr, "bench_quality: %s\n", error.what());
  return 1;
}
