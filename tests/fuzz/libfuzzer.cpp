// libFuzzer target over the same cases as the seeded driver (fuzz_case.hpp); the fuzzer's bytes
// steer the decisions. Built by scripts/fuzz.sh with clang -fsanitize=fuzzer,address,undefined.
#include "fuzz/fuzz_case.hpp"

#include <cstdio>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  relbias_fuzz::source src(std::span<const std::uint8_t>(data, size));
  const std::string verdict = relbias_fuzz::run_one(src);
  if (!verdict.empty()) {
    std::fprintf(stderr, "relbias fuzz: %s\n", verdict.c_str());
    std::abort();
  }
  return 0;
}
