#include "catch.hpp"

#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/t5.hpp>
#include <relbias/train.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

using namespace relbias;

namespace {

// A learned policy with a constraint, as a user would write one: -w_h |i - j| with w_h >= 0.
// It counts project() calls so the tests can see the optimisers make them.
struct nonnegative_slopes {
  using scalar_type = double;
  static constexpr bool is_learned = true;

  param_vector<double> weights;  // (H)
  int projections = 0;

  explicit nonnegative_slopes(index_t heads) : weights(param_vector<double>::Zero(heads)) {}
  index_t num_heads() const { return weights.size(); }
  double operator()(index_t h, index_t i, index_t j) const { return -weights[h] * double(i > j ? i - j : j - i); }
  Eigen::Map<param_vector<double>> parameters() { return {weights.data(), weights.size()}; }
  Eigen::Map<const param_vector<double>> parameters() const { return {weights.data(), weights.size()}; }
  void project() {
    ++projections;
    weights = weights.cwiseMax(0.0);
  }
};
static_assert(learned_bias<nonnegative_slopes>);

// Relative closeness for hand-computed values (a few roundings away).
bool near(double actual, double expected, double tolerance = 1e-14) {
  return std::abs(actual - expected) <= tolerance * std::max(1.0, std::abs(expected));
}

// The message of the exception of type E that f throws, or a marker when it throws none
// (plain string checks work with Catch2 2 and 3 alike).
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "<no exception of the expected type>";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A fresh directory per test case: ctest runs test cases as parallel processes.
struct scratch_directory {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("relbias_test_train_" + std::to_string(std::random_device{}()));
  scratch_directory() { std::filesystem::create_directories(path); }
  ~scratch_directory() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

std::vector<char> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::filesystem::path& path, const std::vector<char>& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace

TEST_CASE("train: SGD with momentum and weight decay, by hand", "[train]") {
  alibi<double, true> bias{2};
  bias.parameters() << 1.0, 2.0;
  sgd<double> opt{0.1, 0.5, 0.1};  // learning rate, momentum, weight decay
  const std::vector<double> grad{1.0, -1.0};
  opt.step(bias, grad);  // g' = g + 0.1 p = (1.1, -0.8); buf = g'; p -= 0.1 buf
  CHECK(near(bias.slope(0), 0.89));
  CHECK(near(bias.slope(1), 2.08));
  opt.step(bias, grad);  // g' = (1.089, -0.792); buf = 0.5 (1.1, -0.8) + g' = (1.639, -1.192)
  CHECK(near(bias.slope(0), 0.7261));
  CHECK(near(bias.slope(1), 2.1992));

  sgd<double> plain{{.learning_rate = 0.5}};  // no momentum, no decay: p -= lr g
  plain.step(bias, grad);
  CHECK(near(bias.slope(0), 0.2261));
  CHECK(near(bias.slope(1), 2.6992));
}

TEST_CASE("train: Adam with bias correction, by hand", "[train]") {
  alibi<double, true> bias{2};
  bias.parameters() << 1.0, 1.0;
  adam<double> opt{0.01};
  opt.step(bias, std::vector<double>{0.5, -2.0});
  // Step 1: m_hat = g and v_hat = g^2, so p -= lr g / (|g| + eps).
  const double after_one = 1.0 + 0.01 * 2.0 / (2.0 + 1e-8);
  CHECK(near(bias.slope(0), 1.0 - 0.01 * 0.5 / (0.5 + 1e-8)));
  CHECK(near(bias.slope(1), after_one));
  opt.step(bias, std::vector<double>{0.5, 0.0});
  // Step 2, slope 1 (g = 0): m = 0.9 * 0.1 * -2 = -0.18, v = 0.999 * 0.001 * 4 = 0.003996;
  // corrections 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999.
  CHECK(near(bias.slope(1), after_one + 0.01 * (0.18 / 0.19) / (std::sqrt(0.003996 / 0.001999) + 1e-8), 1e-12));
  CHECK(opt.steps() == 2);
}

TEST_CASE("train: Adam's learning rate can follow a schedule; the moments are kept", "[train]") {
  alibi<double, true> bias{1};
  bias.parameters() << 1.0;
  adam<double> opt{0.01};
  opt.step(bias, std::vector<double>{2.0});  // m_hat = g, v_hat = g^2: p -= lr
  CHECK(near(bias.slope(0), 1.0 - 0.01 * 2.0 / (2.0 + 1e-8)));
  opt.set_learning_rate(0.5);
  const double before = bias.slope(0);
  opt.step(bias, std::vector<double>{0.0});  // m = 0.18, v = 0.003996: the old moments, the new rate
  CHECK(near(bias.slope(0), before - 0.5 * (0.18 / 0.19) / (std::sqrt(0.003996 / 0.001999) + 1e-8), 1e-12));
  CHECK(opt.options().learning_rate == 0.5);
  CHECK(contains(message_of<std::invalid_argument>([&] { opt.set_learning_rate(-1.0); }),
                 "relbias::adam::set_learning_rate: learning_rate must be finite and >= 0, got -1"));
  CHECK(opt.options().learning_rate == 0.5);
}

TEST_CASE("train: Adam's weight decay is added to the gradient (L2, as torch.optim.Adam)", "[train]") {
  alibi<double, true> bias{1};
  bias.parameters() << 2.0;
  adam<double> opt{{.learning_rate = 0.1, .weight_decay = 0.5}};
  opt.step(bias, std::vector<double>{-1.0});  // g' = -1 + 0.5 * 2 = 0: m = v = 0, no move
  CHECK(bias.slope(0) == 2.0);
  opt.step(bias, std::vector<double>{1.0});  // g' = 2: m = 0.2, v = 0.004; corrections 0.19, 0.001999
  CHECK(near(bias.slope(0), 2.0 - 0.1 * (0.2 / 0.19) / (std::sqrt(0.004 / 0.001999) + 1e-8), 1e-12));
}

TEST_CASE("train: every step ends with the policy's project()", "[train]") {
  nonnegative_slopes bias{2};
  bias.weights << 0.5, 0.5;
  sgd<double> descent{1.0};
  descent.step(bias, std::vector<double>{1.0, -1.0});  // (-0.5, 1.5), projected to (0, 1.5)
  CHECK(bias.projections == 1);
  CHECK(bias.weights[0] == 0.0);
  CHECK(bias.weights[1] == 1.5);

  adam<double> opt{0.1};
  opt.step(bias, std::vector<double>{1.0, 1.0});  // step 1 moves each weight by -lr sign(g)
  CHECK(bias.projections == 2);
  CHECK(bias.weights[0] == 0.0);
  CHECK(near(bias.weights[1], 1.5 - 0.1 / (1.0 + 1e-8)));
}

TEST_CASE("train: KERPLE's projection runs after every step", "[train]") {
  const std::vector<double> r1{0.5, 0.5}, r2{1.0, 1.9};
  kerple_power<double> bias{r1, r2};
  sgd<double> opt{1.0};
  opt.step(bias, std::vector<double>{1.0, 0.0, 0.0, -1.0});  // r1[0] -> -0.5, r2[1] -> 2.9
  CHECK(bias.r1()[0] == 1e-2);
  CHECK(bias.r2()[1] == 2.0);
  CHECK(bias.r1()[1] == 0.5);
}

TEST_CASE("train: wrong gradient sizes, foreign policies and bad hyper-parameters throw", "[train]") {
  alibi<double, true> bias{2};
  bias.parameters() << 1.0, 2.0;
  const param_vector<double> before = bias.parameters();
  sgd<double> descent{0.1};
  adam<double> opt{};
  const std::vector<double> short_grad{1.0};
  const std::string sgd_message = message_of<std::invalid_argument>([&] { descent.step(bias, short_grad); });
  CHECK(contains(sgd_message, "relbias::sgd::step"));
  CHECK(contains(sgd_message, "2 parameters, got 1"));
  CHECK(contains(message_of<std::invalid_argument>([&] { opt.step(bias, short_grad); }), "2 parameters, got 1"));
  CHECK(bias.parameters() == before);  // checked before anything moves
  CHECK(opt.steps() == 0);

  // An optimiser's state belongs to the first policy it stepped.
  opt.step(bias, std::vector<double>{0.1, 0.1});
  alibi<double, true> other{3};
  const std::string foreign = message_of<std::invalid_argument>([&] { opt.step(other, std::vector<double>(3, 0.1)); });
  CHECK(contains(foreign, "state is for 2 parameters, the policy has 3"));

  CHECK(contains(message_of<std::invalid_argument>([] { (void)sgd<double>{-0.1}; }), "learning_rate must be finite and >= 0"));
  CHECK(contains(message_of<std::invalid_argument>([] { (void)sgd<double>{0.1, -1.0}; }), "momentum"));
  CHECK(contains(message_of<std::invalid_argument>([] { (void)adam<double>{1e-3, 1.0}; }), "beta1 must be finite and in [0, 1)"));
  CHECK(contains(message_of<std::invalid_argument>([] { (void)adam<double>{{.beta2 = -0.5}}; }), "beta2"));
  CHECK(contains(message_of<std::invalid_argument>([] { (void)adam<double>{{.eps = std::nan("")}}; }), "eps"));
}

TEST_CASE("train: parameter files round-trip bit for bit", "[train]") {
  const scratch_directory dir;
  alibi<double, true> saved{4};
  saved.parameters() << 0.1, -2.5e-300, 3.0, std::nextafter(1.0, 2.0);
  save_parameters(saved, dir.path / "alibi.bin");
  alibi<double, true> loaded{4};
  load_parameters(loaded, dir.path / "alibi.bin");
  CHECK(loaded.parameters() == saved.parameters());
  // header, the configuration's size and text, the payload
  CHECK(read_bytes(dir.path / "alibi.bin").size() ==
        sizeof(detail::parameter_header) + 4 + saved.configuration().size() + 4 * sizeof(double));
  CHECK_FALSE(std::filesystem::exists(dir.path / "alibi.bin.tmp"));

  nonnegative_slopes user{3};
  user.weights << 1.0, 2.0, 3.0;
  save_parameters(user, dir.path / "user.bin");  // overwritten below: save replaces the file
  user.weights << 4.0, 5.0, 6.0;
  save_parameters(user, dir.path / "user.bin");
  nonnegative_slopes restored{3};
  load_parameters(restored, dir.path / "user.bin");
  CHECK(restored.weights == user.weights);
  CHECK(restored.projections == 0);  // loading stores values as saved

  const std::string unwritable = message_of<std::runtime_error>([&] { save_parameters(user, dir.path / "no" / "such.bin"); });
  CHECK(contains(unwritable, "cannot write"));
  CHECK(contains(unwritable, "such.bin"));
}

TEST_CASE("train: files for another shape or scalar type are rejected, the policy unchanged", "[train]") {
  const scratch_directory dir;
  const auto path = dir.path / "four_doubles.bin";
  alibi<double, true> saved{4};
  save_parameters(saved, path);

  alibi<double, true> fewer{2};
  const param_vector<double> fewer_before = fewer.parameters();
  const std::string count = message_of<std::invalid_argument>([&] { load_parameters(fewer, path); });
  CHECK(contains(count, "four_doubles.bin: file holds alibi(heads 4, trainable); the policy is alibi(heads 2, trainable)"));
  CHECK(fewer.parameters() == fewer_before);

  alibi<float, true> same_heads{4};  // the same configuration, another scalar type
  const param_vector<float> floats_before = same_heads.parameters();
  const std::string scalar = message_of<std::invalid_argument>([&] { load_parameters(same_heads, path); });
  CHECK(contains(scalar, "holds 4 parameters of 8 bytes, the policy has 4 of 4 bytes"));
  CHECK(same_heads.parameters() == floats_before);

  nonnegative_slopes user{2};  // no configuration(): checked by count and scalar size
  const std::string user_count = message_of<std::invalid_argument>([&] { load_parameters(user, path); });
  CHECK(contains(user_count, "four_doubles.bin holds 4 parameters of 8 bytes, the policy has 2 of 8 bytes"));
}

TEST_CASE("train: a file written for another policy or shape is refused, naming both", "[train][promises]") {
  const scratch_directory dir;
  const auto path = dir.path / "policy.bin";
  // Each pair has the same parameter count and scalar type: only the configuration tells them apart.
  auto refused = [&](const auto& saved, auto target, const std::string& expected) {
    REQUIRE(saved.parameters().size() == target.parameters().size());
    save_parameters(saved, path);
    const auto before = target.parameters().eval();
    const std::string message = message_of<std::invalid_argument>([&] { load_parameters(target, path); });
    CHECK(contains(message, expected));
    CHECK(target.parameters() == before);
  };
  t5<float> t5_4{4, masking::causal};  // 32 buckets x 4 heads
  t5_4.reset_parameters(1, 1.0);
  refused(t5_4, t5<float>{2, masking::causal, 64},
          "file holds t5(heads 4, buckets 32, max_distance 128, causal); the policy is t5(heads 2, buckets 64, max_distance 128, causal)");
  refused(t5_4, t5<float>{4, masking::causal, 32, 256}, "the policy is t5(heads 4, buckets 32, max_distance 256, causal)");
  refused(t5_4, t5<float>{4, masking::bidirectional}, "the policy is t5(heads 4, buckets 32, max_distance 128, bidirectional)");
  refused(alibi<float, true>{8}, per_offset<float>{1, masking::causal, 7},
          "file holds alibi(heads 8, trainable); the policy is per_offset(heads 1, clip 7, causal)");
  refused(kerple_log<double>{3, 1}, kerple_power<double>{3, 1}, "file holds kerple_log(heads 3); the policy is kerple_power(heads 3)");
  refused(fire<double>{2, 1, fire_config{.width = 8}}, fire<double>{2, 1, fire_config{.width = 8, .init_L = 256}},
          "file holds fire(heads 2, width 8, init_L 512, eps 1e-06); the policy is fire(heads 2, width 8, init_L 256, eps 1e-06)");

  // The same configuration loads; so does a version 1 file (no configuration recorded).
  t5<float> same{4, masking::causal};
  save_parameters(t5_4, path);
  load_parameters(same, path);
  CHECK(same.parameters() == t5_4.parameters());
  std::vector<char> bytes = read_bytes(path);
  const std::size_t header_size = sizeof(detail::parameter_header);
  std::uint32_t configuration_size = 0;
  std::memcpy(&configuration_size, bytes.data() + header_size, sizeof configuration_size);
  bytes.erase(bytes.begin() + std::ptrdiff_t(header_size), bytes.begin() + std::ptrdiff_t(header_size + 4 + configuration_size));
  const std::uint32_t version_1 = 1;
  std::memcpy(bytes.data() + offsetof(detail::parameter_header, version), &version_1, sizeof version_1);
  write_bytes(path, bytes);
  t5<float> from_version_1{4, masking::causal};
  load_parameters(from_version_1, path);
  CHECK(from_version_1.parameters() == t5_4.parameters());
}

TEST_CASE("train: damaged parameter files throw std::runtime_error naming path and fault", "[train]") {
  const scratch_directory dir;
  alibi<double, true> saved{4};
  saved.parameters() << 0.5, 0.25, 0.125, 0.0625;
  save_parameters(saved, dir.path / "good.bin");
  const std::vector<char> good = read_bytes(dir.path / "good.bin");
  const std::string configuration = saved.configuration();
  const std::size_t header_size = sizeof(detail::parameter_header), payload = header_size + 4 + configuration.size();
  REQUIRE(good.size() == payload + 4 * sizeof(double));

  const auto damaged_path = dir.path / "damaged.bin";
  auto expect_damage = [&](const std::vector<char>& bytes, const std::string& fault) {
    write_bytes(damaged_path, bytes);
    alibi<double, true> target{4};
    const param_vector<double> before = target.parameters();
    const std::string message = message_of<std::runtime_error>([&] { load_parameters(target, damaged_path); });
    CHECK(contains(message, "damaged.bin"));
    CHECK(contains(message, fault));
    CHECK(target.parameters() == before);
  };

  expect_damage({}, "truncated header");
  expect_damage({good.begin(), good.begin() + 10}, "truncated header");
  expect_damage({good.begin(), good.end() - 3}, "truncated payload");
  auto trailing = good;
  trailing.push_back('!');
  expect_damage(trailing, "trailing bytes");
  auto bad_magic = good;
  bad_magic[0] = 'X';
  expect_damage(bad_magic, "bad magic");
  auto future_version = good;
  const std::uint32_t version = detail::parameter_format_version + 1;
  std::memcpy(future_version.data() + offsetof(detail::parameter_header, version), &version, sizeof version);
  expect_damage(future_version, "format version 3, expected 1 to 2");
  auto huge_configuration = good;
  huge_configuration[header_size + 3] = 0x7f;  // its size field
  expect_damage(huge_configuration, "damaged configuration");
  expect_damage({good.begin(), good.begin() + std::ptrdiff_t(header_size + 6)}, "truncated configuration");
  auto flipped = good;
  flipped[payload + 11] ^= 0x10;  // one payload bit
  expect_damage(flipped, "checksum mismatch");
  auto wrong_checksum = good;
  wrong_checksum[offsetof(detail::parameter_header, checksum)] ^= 0x01;
  expect_damage(wrong_checksum, "checksum mismatch");

  alibi<double, true> target{4};
  const std::string missing = message_of<std::runtime_error>([&] { load_parameters(target, dir.path / "missing.bin"); });
  CHECK(contains(missing, "missing.bin"));
  CHECK(contains(missing, "cannot open"));
}

TEST_CASE("train: save_parameters never writes through symlinks planted under its temporary names", "[train]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("relbias_symlinks_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path victim = dir / "victim.txt", path = dir / "kerple.bin";
  std::ofstream(victim) << "untouched";
  // Every name the save may try: path.tmp (no POSIX) and path.tmp.<pid>.<n> (POSIX).
  fs::create_symlink(victim, fs::path(path.string() + ".tmp"));
  for (int n = 0; n < 50; ++n)  // the save tries 100 names
    fs::create_symlink(victim, fs::path(path.string() + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(n)));

  const double r1[] = {0.5, 1.5}, r2[] = {0.25, 0.75};
  const kerple_log<double> saved{r1, r2};
  save_parameters(saved, path);
  std::string text;
  std::ifstream(victim) >> text;
  CHECK(text == "untouched");
  CHECK(!fs::is_symlink(path));
  kerple_log<double> loaded{2, 7};
  load_parameters(loaded, path);
  CHECK(loaded.parameters() == saved.parameters());
  fs::remove_all(dir);
}

TEST_CASE("train: a file whose values validate() rejects is refused, the policy unchanged", "[train]") {
  const auto path = std::filesystem::temp_directory_path() / ("relbias_invalid_" + std::to_string(::getpid()) + ".bin");
  const double r1[] = {0.5, 1.5}, r2[] = {0.25, 0.75};
  for (const double bad : {std::nan(""), std::numeric_limits<double>::infinity(), -1.0, 0.0, 1e-320}) {
    kerple_log<double> written{r1, r2};
    written.parameters()[1] = bad;  // r1 of head 1: must be finite, positive and normal
    save_parameters(written, path);
    kerple_log<double> target{r1, r2};
    const param_vector<double> before = target.parameters();
    CHECK_THROWS_AS(load_parameters(target, path), std::invalid_argument);
    CHECK(target.parameters() == before);
  }
  std::filesystem::remove(path);
}
