#!/usr/bin/env bash
# Instructions each policy adds to the fused kernels, counted by callgrind: a measure of the
# bias's work that a shared, noisy machine cannot disturb (the timings of scripts/bench.sh can).
# Builds bench_once for AVX2 (valgrind does not run AVX-512), one thread, bidirectional, and
# prints per pass the instruction count and its ratio to no bias (the counts include making the
# random inputs, the same for every policy). Run as root on Debian 12:
#   bash scripts/bench-instructions.sh [L]        (default L = 1024; about half an hour)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends valgrind >/dev/null; }

length=${1:-1024}
build=build-instructions
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRELBIAS_BUILD_BENCHMARKS=ON -DRELBIAS_BUILD_TESTS=OFF \
  -DRELBIAS_BUILD_EXAMPLES=OFF -DRELBIAS_NATIVE=OFF -DCMAKE_CXX_FLAGS="-march=x86-64-v3" >/dev/null
cmake --build "$build" -j2 --target bench_once >/dev/null

count() {  # policy, pass -> instructions of the whole run
  OMP_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file=/dev/null "$build/bench/bench_once" "$1" "$length" "$2" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

echo "L = $length, 8 heads, d = 64, fp32, bidirectional, 1 thread: instructions (ratio to none)"
printf '%-14s %16s %8s %16s %8s\n' policy forward ratio backward ratio
for policy in none alibi t5 per_offset kerple_power kerple_log fire; do
  forward=$(count "$policy" forward)
  backward=$(( $(count "$policy" backward) - forward ))
  if [ "$policy" = none ]; then base_forward=$forward base_backward=$backward; fi
  awk -v p="$policy" -v f="$forward" -v b="$backward" -v f0="$base_forward" -v b0="$base_backward" \
    'BEGIN { printf "%-14s %16d %7.3fx %16d %7.3fx\n", p, f, f / f0, b, b / b0 }'
done
