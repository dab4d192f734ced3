#!/usr/bin/env bash
# The test command: installs what is missing, then builds and runs every test two ways: clang
# with warnings as errors under AddressSanitizer + UndefinedBehaviorSanitizer (assertions on),
# and the gcc release build with warnings as errors, last, so that ctest's summary ends the output.
# Build trees: build-asan, build-release (logs beside them as build-*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

# Configures and builds one tree, runs its tests, and prints the time taken then ctest's
# summary line ("100% tests passed, 0 tests failed out of N") as the last line. On a failure
# it shows the build log's tail or ctest's whole output and returns non-zero.
run_suite() {  # build directory, C++ compiler, then CMake arguments
  local dir=$1 compiler=$2 start=$SECONDS status=0
  shift 2
  CXX=$compiler cmake -S . -B "$dir" "$@" >"$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
  cmake --build "$dir" -j2 >>"$dir.log" 2>&1 || { tail -n 60 "$dir.log"; echo "build failed: $dir.log"; return 1; }
  (cd "$dir" && ctest --output-on-failure -j2) >"$dir.ctest.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ] || [ "${verbose:-0}" = 1 ]; then cat "$dir.ctest.log"; fi
  echo "$dir: built and tested in $((SECONDS - start)) s"
  grep -E '^[0-9]+% tests passed' "$dir.ctest.log" | tail -n 1 || echo "ctest printed no summary: $dir.ctest.log"
  return "$status"
}

echo "== clang++, -Werror, AddressSanitizer + UndefinedBehaviorSanitizer"
# Clang: its sanitised build of the Eigen-heavy tests compiled in about 12 minutes and ran in 3 on
# the 2-vCPU CI machine, where gcc's took 17 and 8. Debug keeps assertions (RELBIAS_ASSERT) on;
# -O1 keeps the sanitised suite fast; -g1 (line tables, enough for sanitizer reports) compiles
# about 3x faster than -g. The fuzz driver (tests/fuzz) gets one minute here, 2 s in the release
# build; scripts/fuzz.sh runs longer.
RELBIAS_FUZZ_SECONDS=60 run_suite build-asan clang++ -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DRELBIAS_SANITIZE=ON -DRELBIAS_WERROR=ON
echo "== g++, -Werror"
# The Python package (python/: its extension module, pytest suite and example) is built and tested
# here only: under ASan the interpreter would need the sanitizer runtime preloaded (LD_PRELOAD of
# clang's libclang_rt.asan) and PyTorch's own allocations would be reported, so the sanitised
# build leaves RELBIAS_PYTHON off.
verbose=1 run_suite build-release g++ -DCMAKE_BUILD_TYPE=Release -DRELBIAS_WERROR=ON -DRELBIAS_PYTHON=ON
