#include "catch.hpp"

#include <relbias/bias/alibi.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/t5.hpp>
#include <relbias/train.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

using namespace relbias;

TEST_CASE("train: SGD with momentum and weight decay, by hand", "[train]") {
  alibi<double, true> bias{2};
  bias.parameters() << 1.0, 2.0;
  sgd<double> opt{{.learning_rate = 0.1, .momentum = 0.5, .weight_decay = 0.1}};
  const std::vector<double> grad{1.0, -1.0};
  opt.step(bias, grad);  // g' = (1.1, -0.8); buf = g'; p = (0.89, 2.08)
  CHECK(bias.slope(0) == Approx(0.89).epsilon(1e-14));
  CHECK(bias.slope(1) == Approx(2.08).epsilon(1e-14));
  opt.step(bias, grad);  // g' = (1.089, -0.792); buf = (0.55 + 1.089, -0.4 - 0.792)
  CHECK(bias.slope(0) == Approx(0.89 - 0.1 * 1.639).epsilon(1e-14));
  CHECK(bias.slope(1) == Approx(2.08 + 0.1 * 1.192).epsilon(1e-14));
}

TEST_CASE("train: Adam with bias correction, by hand", "[train]") {
  alibi<double, true> bias{2};
  bias.parameters() << 1.0, 1.0;
  adam<double> opt{{.learning_rate = 0.01}};
  opt.step(bias, std::vector<double>{0.5, -2.0});
  // Step 1: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps).
  CHECK(bias.slope(0) == Approx(1.0 - 0.01 * 0.5 / (0.5 + 1e-8)).epsilon(1e-14));
  CHECK(bias.slope(1) == Approx(1.0 + 0.01 * 2.0 / (2.0 + 1e-8)).epsilon(1e-14));
  opt.step(bias, std::vector<double>{0.5, 0.0});
  // Step 2, slope 1: m = 0.9 * 0.1 * -2 = -0.18, m_hat = -0.18 / 0.19; v = 0.999 * 0.001 * 4, v_hat = v / (1 - 0.999^2).
  const double m_hat = -0.18 / 0.19, v_hat = 0.999 * 0.004 / (1 - 0.999 * 0.999);
  CHECK(bias.slope(1) == Approx(1.0 + 0.01 * 2.0 / (2.0 + 1e-8) - 0.01 * m_hat / (std::sqrt(v_hat) + 1e-8)).epsilon(1e-12));
  CHECK(opt.steps() == 2);
  CHECK_THROWS_WITH(opt.step(bias, std::vector<double>{1.0}), Catch::Contains("2 parameters") && Catch::Contains("got 1"));
}

TEST_CASE("train: KERPLE's projection runs after every step", "[train]") {
  const std::vector<double> r1{0.5, 0.5}, r2{1.0, 1.9};
  kerple_power<double> bias{r1, r2};
  sgd<double> opt{{.learning_rate = 1.0}};
  opt.step(bias, std::vector<double>{1.0, 0.0, 0.0, -1.0});  // r1[0] -> -0.5, r2[1] -> 2.9
  CHECK(bias.r1()[0] == 1e-2);
  CHECK(bias.r2()[1] == 2.0);
  CHECK(bias.r1()[1] == 0.5);
}

TEST_CASE("train: parameter files round-trip and reject wrong or damaged files", "[train]") {
  const auto dir = std::filesystem::temp_directory_path() / "relbias_test_train";
  std::filesystem::create_directories(dir);
  const auto path = dir / "t5.bin";
  t5<float> saved{4, masking::bidirectional};
  saved.reset_parameters(3, 64.0);
  save_parameters(saved, path);
  t5<float> loaded{4, masking::bidirectional};
  load_parameters(loaded, path);
  CHECK(loaded.parameters() == saved.parameters());

  t5<float> other_shape{2, masking::bidirectional};
  CHECK_THROWS_WITH(load_parameters(other_shape, path), Catch::Contains("128 parameters") && Catch::Contains("64"));
  t5<double> other_scalar{4, masking::bidirectional};
  CHECK_THROWS_AS(load_parameters(other_scalar, path), std::invalid_argument);

  auto bytes_of = [](const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  auto write = [](const std::filesystem::path& p, const std::vector<char>& bytes) {
    std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
  };
  const std::vector<char> good = bytes_of(path);
  const auto damaged_path = dir / "damaged.bin";
  auto expect_damage = [&](std::vector<char> bytes, const char* what) {
    write(damaged_path, bytes);
    t5<float> target{4, masking::bidirectional};
    const param_vector<float> before = target.parameters();
    CHECK_THROWS_WITH(load_parameters(target, damaged_path), Catch::Contains(what) && Catch::Contains("damaged.bin"));
    CHECK(target.parameters() == before);  // unchanged
  };
  expect_damage(std::vector<char>(good.begin(), good.begin() + 10), "truncated header");
  expect_damage(std::vector<char>(good.begin(), good.end() - 4), "truncated payload");
  auto flipped = good;
  REQUIRE(flipped.size() > sizeof(detail::parameter_header) + 4);
  flipped[sizeof(detail::parameter_header) + 3] ^= 0x10;  // a payload byte
  expect_damage(flipped, "checksum");
  auto bad_magic = good;
  bad_magic[0] = 'X';
  expect_damage(bad_magic, "magic");
  auto longer = good;
  longer.push_back('!');
  expect_damage(longer, "trailing");
  t5<float> target{4, masking::bidirectional};
  CHECK_THROWS_WITH(load_parameters(target, dir / "missing.bin"), Catch::Contains("cannot open"));
  std::filesystem::remove_all(dir);
}
