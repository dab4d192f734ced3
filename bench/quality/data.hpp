#pragma once
// The quality benchmark's data: Debian's fortunes as character tokens (training files and
// held-out files, whole files apart), a user's own corpus as bytes, and the synthetic
// copy-k-back probe.

#include <relbias/detail/random.hpp>
#include <relbias/offset.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace quality {

using relbias::index_t;

/// Characters: '\n' -> 0, printable ASCII ' '..'~' -> 1..95, tab -> ' ', anything else (bytes
/// of UTF-8 sequences, control codes) -> 96.
inline constexpr index_t text_vocab = 97;
inline int char_token(unsigned char c) {
  if (c == '\n') return 0;
  if (c == '\t') c = ' ';
  if (c >= 32 && c <= 126) return int(c) - 31;
  return 96;
}

/// Files of /usr/share/games/fortunes never trained on. Whole files, so no record (and no
/// author's style within a file) is seen on both sides.
inline const std::set<std::string> held_out_files = {"literature", "science", "wisdom"};

struct text_corpus {
  std::vector<int> train;     // fortunes: training files, records in file order, each followed by "%\n"
  std::vector<int> held_out;  // held-out files, same format; a user corpus: the files' bytes
  std::vector<std::string> train_files, held_out_files;
  index_t vocab = text_vocab;      // 97 characters for the fortunes, 256 bytes for a user corpus
  std::uintmax_t corpus_bytes = 0;  // every file read, before keep_every thins the training part
  std::string split;                // how the held-out part was chosen, in words
};

/// The records of one fortune file: text between lines holding a single '%'.
inline std::vector<std::string> read_records(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<std::string> records(1);
  std::string line;
  while (std::getline(in, line)) {
    if (line == "%") records.emplace_back();
    else records.back().append(line).push_back('\n');
  }
  std::erase_if(records, [](const std::string& r) { return r.empty(); });
  return records;
}

/// Reads every fortune file of directory (not the .dat indices, not the .u8 links), in name
/// order. keep_every = n > 1 keeps only every n-th training record (the small-data runs); the
/// held-out side is always complete.
inline text_corpus read_fortunes(const std::filesystem::path& directory, index_t keep_every = 1) {
  if (!std::filesystem::is_directory(directory))
    throw std::invalid_argument("quality::read_fortunes: no directory " + directory.string() +
                                " (Debian's fortunes package: apt-get install fortunes)");
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(directory))
    if (entry.is_regular_file() && !entry.is_symlink() && entry.path().extension().empty()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());

  text_corpus corpus;
  index_t record_number = 0;
  for (const auto& file : files) {
    const std::string name = file.filename().string();
    const bool held_out = held_out_files.contains(name);
    (held_out ? corpus.held_out_files : corpus.train_files).push_back(name);
    for (const std::string& record : read_records(file)) {
      if (!held_out && record_number++ % keep_every != 0) continue;
      auto& tokens = held_out ? corpus.held_out : corpus.train;
      for (unsigned char c : record) tokens.push_back(char_token(c));
      tokens.push_back(char_token('%'));
      tokens.push_back(char_token('\n'));
    }
  }
  if (corpus.train.empty() || corpus.held_out.empty())
    throw std::invalid_argument("quality::read_fortunes: " + directory.string() + " lacks training or held-out files");
  for (const auto& file : files) corpus.corpus_bytes += std::filesystem::file_size(file);
  corpus.split = "fortune files literature, science, wisdom";
  return corpus;
}

// A user's corpus (bench_quality --corpus): read as bytes, so any language and any encoding
// works without a character table; the split and the small-data rule are below.

/// Tokens are the bytes 0..255 of the files.
inline constexpr index_t byte_vocab = 256;
/// The small-data runs of a user corpus keep every keep_every-th block of this many training bytes.
inline constexpr index_t small_data_block = 1024;

struct corpus_options {
  std::vector<std::string> held_out;  // --held-out: whole files; empty: held_out_fraction decides
  double held_out_fraction = 0.1;     // --held-out-fraction, in (0, 1)
  index_t keep_every = 1;             // --keep-every: 1 keeps all training bytes
};

/// One file of a user corpus, named as the user would type it: the --corpus path, and for a file
/// found in a --corpus directory also its path below that directory.
struct corpus_file {
  std::filesystem::path path;  // --corpus root / relative
  std::string relative;        // below its --corpus directory (the file name for a --corpus file)
};

inline std::string format_number(double x) {
  std::ostringstream s;
  s << x;
  return s.str();
}

/// The files of the --corpus paths in corpus order: the paths in the order given, a directory's
/// regular files recursively in path order. A link to a file is read; a link to a directory is
/// rejected (not followed), as is anything that is not a file or directory: nothing is skipped.
inline std::vector<corpus_file> list_corpus_files(const std::vector<std::string>& roots) {
  namespace fs = std::filesystem;
  const std::string where = "quality::list_corpus_files: ";
  if (roots.empty()) throw std::invalid_argument(where + "no --corpus path given");
  std::vector<corpus_file> files;
  for (const std::string& root : roots) {
    if (!fs::exists(root)) throw std::invalid_argument(where + "--corpus " + root + ": no such file or directory");
    if (fs::is_regular_file(root)) {
      files.push_back({root, fs::path(root).filename().string()});
      continue;
    }
    if (!fs::is_directory(root)) throw std::invalid_argument(where + "--corpus " + root + " is neither a file nor a directory");
    std::vector<corpus_file> below;
    try {
      for (const auto& entry : fs::recursive_directory_iterator(root)) {
        if (entry.is_directory() && !entry.is_symlink()) continue;
        if (!entry.is_regular_file())
          throw std::invalid_argument(where + entry.path().string() +
                                      " is not a regular file (a link to a directory, a pipe, a broken link?): remove it or name the "
                                      "files with --corpus");
        below.push_back({entry.path(), fs::relative(entry.path(), root).generic_string()});
      }
    } catch (const fs::filesystem_error& error) {
      throw std::invalid_argument(where + "cannot list --corpus " + root + ": " + error.what());
    }
    if (below.empty()) throw std::invalid_argument(where + "the corpus is empty: directory " + root + " holds no files");
    std::sort(below.begin(), below.end(), [](const corpus_file& a, const corpus_file& b) { return a.path < b.path; });
    files.insert(files.end(), below.begin(), below.end());
  }
  std::set<fs::path> seen;
  for (const corpus_file& f : files)
    if (!seen.insert(fs::weakly_canonical(f.path)).second)
      throw std::invalid_argument(where + f.path.string() + " is named twice by the --corpus paths");
  return files;
}

/// The whole file as bytes; an unreadable file is an error, never an empty one.
inline std::string read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument("quality::read_file_bytes: cannot read " + path.string() + ": " + std::strerror(errno));
  std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) throw std::invalid_argument("quality::read_file_bytes: error while reading " + path.string());
  return bytes;
}

/// True if --held-out name means file: its path as listed, its path below its --corpus
/// directory, or the same file by another path.
inline bool names_file(const std::string& name, const corpus_file& file) {
  namespace fs = std::filesystem;
  return name == file.path.string() || name == file.relative || fs::weakly_canonical(name) == fs::weakly_canonical(file.path);
}

/// Which of several files are held out: those named by options.held_out; otherwise whole files
/// from the end of corpus order until at least held_out_fraction of the bytes are held out, or
/// until only the first file is left for training.
inline std::vector<bool> choose_held_out(const std::vector<corpus_file>& files, const std::vector<std::size_t>& sizes,
                                         const corpus_options& options) {
  const std::string where = "quality::choose_held_out: ";
  std::vector<bool> held(files.size(), false);
  if (!options.held_out.empty()) {
    for (const std::string& name : options.held_out) {
      const auto match = std::find_if(files.begin(), files.end(), [&](const corpus_file& f) { return names_file(name, f); });
      if (match == files.end())
        throw std::invalid_argument(where + "--held-out " + name + " is not a file of the corpus (its " + std::to_string(files.size()) +
                                    " files begin with " + files.front().path.string() + ")");
      held[std::size_t(match - files.begin())] = true;
    }
    if (std::count(held.begin(), held.end(), true) == std::ssize(files))
      throw std::invalid_argument(where + "--held-out names all " + std::to_string(files.size()) + " files of the corpus: none is left to train on");
    return held;
  }
  const double total = double(std::accumulate(sizes.begin(), sizes.end(), std::size_t(0)));
  double held_bytes = 0;
  for (std::size_t f = files.size() - 1; f > 0 && held_bytes < options.held_out_fraction * total; --f) {
    held[f] = true;
    held_bytes += double(sizes[f]);
  }
  return held;
}

/// The small-data rule for a user corpus: blocks 0, n, 2n, ... of small_data_block bytes of the
/// training stream, concatenated (n = keep_every; the last block may be shorter).
inline std::vector<int> keep_every_block(const std::vector<int>& stream, index_t keep_every) {
  if (keep_every <= 1) return stream;
  std::vector<int> kept;
  const auto step = std::size_t(small_data_block * keep_every);
  for (std::size_t start = 0; start < stream.size(); start += step) {
    const std::size_t end = std::min(stream.size(), start + std::size_t(small_data_block));
    kept.insert(kept.end(), stream.begin() + std::ptrdiff_t(start), stream.begin() + std::ptrdiff_t(end));
  }
  return kept;
}

inline void append_bytes(std::vector<int>& tokens, const std::string& bytes) {
  for (unsigned char c : bytes) tokens.push_back(int(c));
}

/// A user's corpus as bytes (vocabulary 256). Several files: held out whole (choose_held_out), the
/// training and held-out streams each the concatenation of their files in corpus order. One file:
/// its last ceil(held_out_fraction * size) bytes are held out. keep_every > 1 thins the training
/// stream by blocks (keep_every_block); the held-out side is always complete.
inline text_corpus read_corpus(const std::vector<std::string>& roots, const corpus_options& options) {
  const std::string where = "quality::read_corpus: ";
  if (!(options.held_out_fraction > 0 && options.held_out_fraction < 1))
    throw std::invalid_argument(where + "--held-out-fraction must lie in (0, 1), got " + format_number(options.held_out_fraction));
  if (options.keep_every < 1) throw std::invalid_argument(where + "--keep-every must be >= 1, got " + std::to_string(options.keep_every));
  const std::vector<corpus_file> files = list_corpus_files(roots);
  std::vector<std::string> contents;
  std::vector<std::size_t> sizes;
  text_corpus corpus;
  corpus.vocab = byte_vocab;
  for (const corpus_file& f : files) {
    contents.push_back(read_file_bytes(f.path));
    sizes.push_back(contents.back().size());
    corpus.corpus_bytes += contents.back().size();
  }
  if (corpus.corpus_bytes == 0)
    throw std::invalid_argument(where + "the corpus is empty: its " + std::to_string(files.size()) + " file(s), beginning with " +
                                files.front().path.string() + ", hold 0 bytes");

  if (files.size() == 1) {
    if (!options.held_out.empty())
      throw std::invalid_argument(where + "--held-out needs a corpus of several files; " + files.front().path.string() +
                                  " is the only one (its tail is held out: --held-out-fraction)");
    const std::string& bytes = contents.front();
    const auto tail = std::min(bytes.size(), std::size_t(std::ceil(options.held_out_fraction * double(bytes.size()))));
    append_bytes(corpus.train, bytes.substr(0, bytes.size() - tail));
    append_bytes(corpus.held_out, bytes.substr(bytes.size() - tail));
    corpus.train_files = {files.front().path.string()};
    corpus.split = "tail fraction " + format_number(options.held_out_fraction);
  } else {
    const std::vector<bool> held = choose_held_out(files, sizes, options);
    for (std::size_t f = 0; f < files.size(); ++f) {
      append_bytes(held[f] ? corpus.held_out : corpus.train, contents[f]);
      (held[f] ? corpus.held_out_files : corpus.train_files).push_back(files[f].path.string());
    }
    corpus.split = options.held_out.empty()
                       ? "whole files, the last in corpus order, until fraction " + format_number(options.held_out_fraction)
                       : "whole files named by --held-out";
  }
  corpus.train = keep_every_block(corpus.train, options.keep_every);
  return corpus;
}

/// Throws unless there is one training window of length seq (seq + 1 tokens: the inputs and the
/// last target) and one held-out window of the longest evaluation length.
inline void check_lengths(const text_corpus& corpus, index_t seq, index_t longest_eval, index_t keep_every) {
  const std::string where = "quality::check_lengths: ";
  if (std::ssize(corpus.train) < seq + 1)
    throw std::invalid_argument(where + "the training part has " + std::to_string(corpus.train.size()) + " tokens (after --keep-every " +
                                std::to_string(keep_every) + "); one window of length " + std::to_string(seq) + " needs " +
                                std::to_string(seq + 1) + ": add text or hold out less");
  if (std::ssize(corpus.held_out) < longest_eval + 1)
    throw std::invalid_argument(where + "the held-out part has " + std::to_string(corpus.held_out.size()) +
                                " tokens; evaluating at the longest length " + std::to_string(longest_eval) + " needs " +
                                std::to_string(longest_eval + 1) + ": hold out more (--held-out, --held-out-fraction) or add text");
}

/// The tokens bits_per_char scores when asked for wanted tokens at this length: whole windows
/// within the held-out part (its last token is only a target).
inline index_t scored_tokens(index_t held_out_tokens, index_t wanted, index_t length) {
  return std::min(wanted, held_out_tokens - 1) / length * length;
}

/// One batch of (input, next-character target) windows of length seq.
struct batch_tokens {
  std::vector<int> tokens, targets;  // (batch * seq) each
};

/// Random windows of the training stream; the generator fixes the data order, so every scheme
/// of one seed sees the same windows in the same order.
inline batch_tokens sample_text(const std::vector<int>& stream, index_t batch, index_t seq,
                                relbias::detail::random_stream& rng) {
  batch_tokens b;
  const auto starts = std::uint64_t(std::ssize(stream) - seq);  // the target of the last input exists
  for (index_t n = 0; n < batch; ++n) {
    const auto start = std::ptrdiff_t(rng.next() % starts);
    b.tokens.insert(b.tokens.end(), stream.begin() + start, stream.begin() + start + seq);
    b.targets.insert(b.targets.end(), stream.begin() + start + 1, stream.begin() + start + seq + 1);
  }
  return b;
}

/// Windows [first, first + count) of length seq cut from the start of stream, without overlap.
inline batch_tokens consecutive_windows(std::span<const int> stream, index_t first, index_t count, index_t seq) {
  batch_tokens b;
  const auto begin = stream.begin() + first * seq;
  b.tokens.assign(begin, begin + count * seq);
  b.targets.assign(begin + 1, begin + count * seq + 1);
  return b;
}

/// The probe: predict the symbol k positions back among uniformly random symbols, k in 5..9
/// drawn per sequence. Every token carries k and its own symbol (token = (k - 5) * 16 + symbol),
/// so the model knows which distance to read; only where it reads from has to come from position.
/// Targets are symbols 0..15 at positions t >= k, -1 (not scored) before.
struct probe_task {
  static constexpr index_t symbols = 16;
  static constexpr index_t min_k = 5, max_k = 9;
  index_t seq = 32;

  batch_tokens sample(index_t batch, relbias::detail::random_stream& rng) const {
    batch_tokens b;
    for (index_t n = 0; n < batch; ++n) {
      const auto k = min_k + index_t(rng.next() % std::uint64_t(max_k - min_k + 1));
      std::vector<int> symbol(static_cast<std::size_t>(seq));
      for (int& s : symbol) s = int(rng.next() % symbols);
      for (index_t t = 0; t < seq; ++t) {
        b.tokens.push_back(int((k - min_k) * symbols) + symbol[std::size_t(t)]);
        b.targets.push_back(t >= k ? symbol[std::size_t(t - k)] : -1);
      }
    }
    return b;
  }
};

}  // namespace quality
