#pragma once
// The quality benchmark's data: Debian's fortunes as character tokens (training files and
// held-out files, whole files apart) and the synthetic copy-k-back probe.

#include <relbias/detail/random.hpp>
#include <relbias/offset.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <span>
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
  std::vector<int> train;     // training files, records in file order, each followed by "%\n"
  std::vector<int> held_out;  // held-out files, same format
  std::vector<std::string> train_files, held_out_files;
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
  return corpus;
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
