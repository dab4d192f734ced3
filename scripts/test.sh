#!/usr/bin/env bash
# The test command: installs what is missing, then builds and runs every test three ways:
# clang with warnings as errors, gcc under AddressSanitizer + UndefinedBehaviorSanitizer, and
# the gcc release build with warnings as errors, last, so that ctest's summary ends the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

run_suite() {  # build directory, then CMake arguments
  local dir=$1
  shift
  cmake -S . -B "$dir" "$@" >/dev/null
  cmake --build "$dir" -j2 >"$dir.log" 2>&1 || { tail -n 60 "$dir.log"; return 1; }
  (cd "$dir" && ctest --output-on-failure -j2) | "${summary[@]}"
}

summary=(tail -n 4)  # the earlier suites show their summary only (all of it on failure: ctest lists the failed tests last)
echo "== clang++, -Werror"
CXX=clang++ run_suite build-clang -DCMAKE_BUILD_TYPE=Release -DRELBIAS_WERROR=ON
echo "== g++, AddressSanitizer + UndefinedBehaviorSanitizer"
run_suite build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" -DRELBIAS_SANITIZE=ON
echo "== g++, -Werror"
summary=(cat)
run_suite build-release -DCMAKE_BUILD_TYPE=Release -DRELBIAS_WERROR=ON
