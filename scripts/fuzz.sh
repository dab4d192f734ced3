#!/usr/bin/env bash
# Long fuzz runs of the attention kernels (tests/fuzz/fuzz_case.hpp; CI runs the seeded driver for
# one minute under ASan + UBSan). Usage:
#   bash scripts/fuzz.sh [seconds] [seed]   seeded Catch2 driver, clang ASan + UBSan (default 600 s, seed 1)
#   bash scripts/fuzz.sh libfuzzer [seconds] libFuzzer (clang, ASan + UBSan), corpus in build-libfuzzer/corpus
# A failure prints the seed and case number (seeded) or the crashing input (libFuzzer) to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = libfuzzer ]; then
  seconds=${2:-600}
  mkdir -p build-libfuzzer/corpus
  echo "== building the libFuzzer target (clang++, -fsanitize=fuzzer,address,undefined)"
  clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -Iinclude -Itests -I/usr/include/eigen3 tests/fuzz/libfuzzer.cpp -o build-libfuzzer/relbias_libfuzzer
  cd build-libfuzzer
  exec ./relbias_libfuzzer -max_total_time="$seconds" -max_len=512 -rss_limit_mb=4096 -print_final_stats=1 corpus
fi

seconds=${1:-600}
seed=${2:-1}
echo "== building the sanitizer tests (clang, ASan + UBSan) in build-asan, as scripts/test.sh does"
CXX=clang++ cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DRELBIAS_SANITIZE=ON \
  -DRELBIAS_WERROR=ON >/dev/null
cmake --build build-asan --target relbias_tests -j2 >/dev/null
echo "== fuzzing for $seconds s, seed $seed"
LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp RELBIAS_FUZZ_SECONDS=$seconds RELBIAS_FUZZ_SEED=$seed \
  build-asan/tests/relbias_tests "[fuzz]"
