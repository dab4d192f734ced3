// The quality benchmark on a user's corpus (bench/quality/data.hpp): the reader's byte tokens,
// its split by whole files and by tail, the small-data blocks, and every class of bad input,
// on the tiny corpus of tests/data/corpus (4 files, one in a subdirectory, one with UTF-8 text of
// a dozen scripts). The run end to end and the unreadable file: run_bench_quality.py (ctest).
#include "catch.hpp"

#include "quality/data.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

namespace fs = std::filesystem;
using quality::index_t;

const fs::path corpus_dir = fs::path(__FILE__).parent_path().parent_path() / "data" / "corpus";
// Corpus order: the directory's files recursively, sorted by path.
const std::vector<std::string> corpus_order = {"01-rivers.txt", "02-bread.txt", "03-languages.txt", "notes/04-weather.txt"};

std::string file_bytes(const std::string& relative) { return quality::read_file_bytes(corpus_dir / relative); }

std::vector<int> tokens_of(std::initializer_list<std::string> relatives) {
  std::vector<int> tokens;
  for (const std::string& r : relatives) quality::append_bytes(tokens, file_bytes(r));
  return tokens;
}

std::string path_of(const std::string& relative) { return (corpus_dir / relative).string(); }

/// A fresh directory under the system's temporary directory, removed at the end of the test.
struct temp_dir {
  fs::path path = fs::temp_directory_path() / ("relbias_corpus_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
  temp_dir() { fs::create_directories(path); }
  ~temp_dir() { fs::remove_all(path); }
  static int& counter() {
    static int n = 0;
    return n;
  }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path / name, std::ios::binary) << bytes;
    return (path / name).string();
  }
};

/// f must throw std::invalid_argument whose message holds every one of parts.
template <class F>
void check_rejected(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    FAIL("no exception; expected std::invalid_argument");
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    INFO("message: " << message);
    for (const std::string& part : parts) CHECK(message.find(part) != std::string::npos);
  }
}

quality::text_corpus read_dir(const quality::corpus_options& options = {}) { return quality::read_corpus({corpus_dir.string()}, options); }

}  // namespace

TEST_CASE("corpus: a directory is read recursively as bytes, its last files held out", "[quality][corpus]") {
  const quality::text_corpus c = read_dir();  // fraction 0.1 of 5,496 bytes: the last file is enough
  CHECK(c.vocab == 256);
  CHECK(c.corpus_bytes == 5496);
  CHECK(c.train == tokens_of({"01-rivers.txt", "02-bread.txt", "03-languages.txt"}));
  CHECK(c.held_out == tokens_of({"notes/04-weather.txt"}));
  CHECK(c.train_files == std::vector<std::string>{path_of("01-rivers.txt"), path_of("02-bread.txt"), path_of("03-languages.txt")});
  CHECK(c.held_out_files == std::vector<std::string>{path_of("notes/04-weather.txt")});
  CHECK(c.split == "whole files, the last in corpus order, until fraction 0.1");
  // UTF-8 stays bytes: "Straße" is 'S' 't' 'r' 'a' 0xC3 0x9F 'e', every value kept.
  const std::vector<int> strasse = {'S', 't', 'r', 'a', 0xC3, 0x9F, 'e'};
  CHECK(std::search(c.train.begin(), c.train.end(), strasse.begin(), strasse.end()) != c.train.end());
  CHECK(*std::max_element(c.train.begin(), c.train.end()) >= 0xE0);  // 3- and 4-byte sequences too
}

TEST_CASE("corpus: --held-out-fraction takes files from the end until the fraction is reached", "[quality][corpus]") {
  quality::corpus_options half;
  half.held_out_fraction = 0.5;  // 04 (1,425) is 26 %; 03 + 04 (2,960) are 54 %
  const quality::text_corpus c = read_dir(half);
  CHECK(c.held_out == tokens_of({"03-languages.txt", "notes/04-weather.txt"}));
  CHECK(c.train == tokens_of({"01-rivers.txt", "02-bread.txt"}));

  quality::corpus_options almost_all;
  almost_all.held_out_fraction = 0.99;  // stops with one training file left
  CHECK(read_dir(almost_all).train == tokens_of({"01-rivers.txt"}));
}

TEST_CASE("corpus: --held-out names whole files by path or by their path below the directory", "[quality][corpus]") {
  quality::corpus_options named;
  named.held_out = {"02-bread.txt", path_of("notes/04-weather.txt")};
  const quality::text_corpus c = read_dir(named);
  CHECK(c.held_out == tokens_of({"02-bread.txt", "notes/04-weather.txt"}));  // corpus order, not the order named
  CHECK(c.train == tokens_of({"01-rivers.txt", "03-languages.txt"}));
  CHECK(c.held_out_files == std::vector<std::string>{path_of("02-bread.txt"), path_of("notes/04-weather.txt")});
  CHECK(c.split == "whole files named by --held-out");
}

TEST_CASE("corpus: a single file holds out its tail", "[quality][corpus]") {
  quality::corpus_options quarter;
  quarter.held_out_fraction = 0.25;
  const quality::text_corpus c = quality::read_corpus({path_of("03-languages.txt")}, quarter);
  std::vector<int> whole = tokens_of({"03-languages.txt"});
  const auto tail = std::size_t(std::ceil(0.25 * double(whole.size())));  // 384 of 1,535
  CHECK(c.held_out.size() == tail);
  CHECK(c.held_out == std::vector<int>(whole.end() - std::ptrdiff_t(tail), whole.end()));
  CHECK(c.train == std::vector<int>(whole.begin(), whole.end() - std::ptrdiff_t(tail)));
  CHECK(c.held_out_files.empty());
  CHECK(c.split == "tail fraction 0.25");
}

TEST_CASE("corpus: the small-data runs keep every n-th 1 KiB block of the training bytes", "[quality][corpus]") {
  std::vector<int> stream(5000);
  for (std::size_t n = 0; n < stream.size(); ++n) stream[n] = int(n % 251);
  const std::vector<int> kept = quality::keep_every_block(stream, 2);  // blocks at 0, 2048, 4096 (904 bytes)
  std::vector<int> expected(stream.begin(), stream.begin() + 1024);
  expected.insert(expected.end(), stream.begin() + 2048, stream.begin() + 3072);
  expected.insert(expected.end(), stream.begin() + 4096, stream.end());
  CHECK(kept == expected);
  CHECK(quality::keep_every_block(stream, 1) == stream);

  quality::corpus_options small;
  small.keep_every = 20;
  const quality::text_corpus c = read_dir(small);
  const std::vector<int> all_training = read_dir().train;
  CHECK(c.train == std::vector<int>(all_training.begin(), all_training.begin() + 1024));
  CHECK(c.held_out == read_dir().held_out);  // the held-out side is never thinned
}

TEST_CASE("corpus: the evaluation scores whole windows of what the held-out part holds", "[quality][corpus]") {
  CHECK(quality::scored_tokens(1425, 32768, 64) == 1408);  // 22 windows; the last token is only a target
  CHECK(quality::scored_tokens(1425, 32768, 1024) == 1024);
  CHECK(quality::scored_tokens(100000, 32768, 1024) == 32768);
}

TEST_CASE("corpus: bad input is rejected with std::invalid_argument naming the problem", "[quality][corpus]") {
  const std::string dir = corpus_dir.string();
  SECTION("a missing path") {
    check_rejected([&] { quality::read_corpus({dir + "/no-such-file"}, {}); }, {"no such file or directory", dir + "/no-such-file"});
  }
  SECTION("an empty directory, or files without bytes") {
    const temp_dir empty;
    check_rejected([&] { quality::read_corpus({empty.path.string()}, {}); }, {"empty", "holds no files", empty.path.string()});
    const temp_dir zero;
    const std::string a = zero.write("a.txt", ""), b = zero.write("b.txt", "");
    check_rejected([&] { quality::read_corpus({zero.path.string()}, {}); }, {"empty", "2 file(s)", "0 bytes", a});
  }
  SECTION("--held-out naming a file not in the corpus") {
    quality::corpus_options o;
    o.held_out = {"05-missing.txt"};
    check_rejected([&] { read_dir(o); }, {"--held-out 05-missing.txt", "not a file of the corpus", "4 files"});
  }
  SECTION("--held-out naming every file, or used with a single file") {
    quality::corpus_options o;
    o.held_out = corpus_order;
    check_rejected([&] { read_dir(o); }, {"all 4 files", "none is left to train on"});
    o.held_out = {"03-languages.txt"};
    check_rejected([&] { quality::read_corpus({path_of("03-languages.txt")}, o); }, {"several files", path_of("03-languages.txt")});
  }
  SECTION("a fraction outside (0, 1)") {
    for (double x : {0.0, 1.0, -0.1, 1.5, std::nan("")}) {
      quality::corpus_options o;
      o.held_out_fraction = x;
      check_rejected([&] { read_dir(o); }, {"--held-out-fraction must lie in (0, 1)", quality::format_number(x)});
    }
  }
  SECTION("the same file named twice") {
    check_rejected([&] { quality::read_corpus({dir, path_of("02-bread.txt")}, {}); }, {"named twice", "02-bread.txt"});
  }
  SECTION("a held-out part shorter than the longest evaluation window") {
    quality::corpus_options o;
    o.held_out_fraction = 0.05;
    const quality::text_corpus tail = quality::read_corpus({path_of("03-languages.txt")}, o);  // 77 bytes held out
    check_rejected([&] { quality::check_lengths(tail, 64, 16 * 64, 1); }, {"held-out part has 77 tokens", "1024", "needs 1025"});
    CHECK_NOTHROW(quality::check_lengths(tail, 4, 76, 1));  // 76 + 1 tokens: exactly enough
  }
  SECTION("a training part shorter than one window") {
    quality::corpus_options o;
    o.held_out_fraction = 0.99;  // 15 bytes left for training
    const quality::text_corpus tail = quality::read_corpus({path_of("03-languages.txt")}, o);
    check_rejected([&] { quality::check_lengths(tail, 64, 64, 1); }, {"training part has 15 tokens", "length 64 needs 65"});
  }
}
