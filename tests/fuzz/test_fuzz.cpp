// The seeded fuzz driver (fuzz_case.hpp): random valid and invalid attention calls for a time
// budget. Reproducible: case n of seed s is the same call on every machine.
//   RELBIAS_FUZZ_SECONDS   budget in seconds (default 2; CI's sanitizer build runs 60)
//   RELBIAS_FUZZ_SEED      seed (default 1)
//   RELBIAS_FUZZ_CASE      run only this case number (to reproduce a failure)
#include "catch.hpp"
#include "fuzz/fuzz_case.hpp"

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

std::uint64_t environment_number(const char* name, std::uint64_t fallback) {
  const char* text = std::getenv(name);
  return text && *text ? std::strtoull(text, nullptr, 10) : fallback;
}

std::uint64_t case_seed(std::uint64_t seed, std::uint64_t n) { return seed * 0x9E3779B97F4A7C15ull + n; }

}  // namespace

TEST_CASE("fuzz: random calls give std::invalid_argument or fused == reference", "[fuzz]") {
  const std::uint64_t seed = environment_number("RELBIAS_FUZZ_SEED", 1);
  if (std::getenv("RELBIAS_FUZZ_CASE")) {
    const std::uint64_t n = environment_number("RELBIAS_FUZZ_CASE", 0);
    relbias_fuzz::source src(case_seed(seed, n));
    const std::string verdict = relbias_fuzz::run_one(src);
    INFO("seed " << seed << ", case " << n);
    CHECK(verdict == "");
    return;
  }
  const auto budget = std::chrono::duration<double>(double(environment_number("RELBIAS_FUZZ_SECONDS", 2)));
  const auto start = std::chrono::steady_clock::now();
  std::uint64_t n = 0;
  for (; std::chrono::steady_clock::now() - start < budget; ++n) {
    relbias_fuzz::source src(case_seed(seed, n));
    const std::string verdict = relbias_fuzz::run_one(src);
    if (!verdict.empty()) {
      FAIL("seed " << seed << ", case " << n << " (rerun with RELBIAS_FUZZ_SEED=" << seed << " RELBIAS_FUZZ_CASE=" << n
                   << "): " << verdict);
    }
  }
  std::cout << "fuzz: " << n << " executions (seed " << seed << ") in "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s, nothing found\n";
  CHECK(n > 0);
}
