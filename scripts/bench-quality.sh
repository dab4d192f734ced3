#!/usr/bin/env bash
# The quality benchmark: trains a small character transformer on Debian's fortunes with every
# bias scheme (two seeds), evaluates held-out bits per character at 1x..16x the training length,
# trains on 5 % of the data, runs the copy-k-back probe, and writes OUT/quality/ (tables, plots,
# every run's JSON, summary.json). About 10-15 minutes on 2 cores; QUICK=1 well under a minute.
#   bash scripts/bench-quality.sh OUT          (OUT defaults to bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
build=build-bench
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)

echo "quality: building bench_quality"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRELBIAS_BUILD_BENCHMARKS=ON -DRELBIAS_BUILD_TESTS=OFF \
  -DRELBIAS_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" --target bench_quality -j2 >/dev/null

rm -rf "$out/quality/runs"
/usr/bin/python3 bench/quality/run.py "$build/bench/bench_quality" "$out/quality" "${quick[@]}"
command="bash scripts/bench-quality.sh $out"
[ "${QUICK:-0}" = 1 ] && command="QUICK=1 $command"
/usr/bin/python3 bench/quality/report.py "$out/quality" "$command"
