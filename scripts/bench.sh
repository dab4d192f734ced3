#!/usr/bin/env bash
# The main job: installs what is missing, builds the benchmark suite and compares every bias
# scheme (forward sweep, decode, backward, peak memory), then writes bench/results/results.md
# and the plots. Run as root on Debian 12:  bash scripts/bench.sh
# QUICK=1 runs a short version (smaller lengths) for a smoke check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

build=build-bench
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRELBIAS_BUILD_BENCHMARKS=ON -DRELBIAS_BUILD_TESTS=OFF \
  -DRELBIAS_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j2 >/dev/null

out=bench/results
mkdir -p "$out"
filter_forward='.*'
filter_backward='.*'
memory_length=32768
sweep_repetitions=3
if [ "${QUICK:-0}" = 1 ]; then
  sweep_repetitions=1
  filter_forward='L:(256|1024)/'
  filter_backward='L:1024/'
  memory_length=4096
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# Sweeps: three interleaved repetitions of every point, the report keeps the fastest.
sweep=(--benchmark_repetitions="$sweep_repetitions" --benchmark_enable_random_interleaving=true --benchmark_out_format=json)
"$build/bench/bench_forward" --benchmark_filter="$filter_forward" "${sweep[@]}" --benchmark_out="$out/forward.json"
# Decoding steps are short: repeated and interleaved, the report takes the best of five.
"$build/bench/bench_decode" --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
  --benchmark_out="$out/decode.json" --benchmark_out_format=json
"$build/bench/bench_backward" --benchmark_filter="$filter_backward" "${sweep[@]}" --benchmark_out="$out/backward.json"
# The acceptance checks at L = 4096, repeated and interleaved (a shared VM is noisy): medians
# and best runs.
targets='/L:4096/causal:0'
repetitions=11
[ "${QUICK:-0}" = 1 ] && repetitions=3
"$build/bench/bench_forward" --benchmark_filter="$targets" --benchmark_repetitions=$repetitions \
  --benchmark_enable_random_interleaving=true --benchmark_out="$out/targets_forward.json" --benchmark_out_format=json >/dev/null
"$build/bench/bench_backward" --benchmark_filter="$targets" --benchmark_repetitions=$repetitions \
  --benchmark_enable_random_interleaving=true --benchmark_out="$out/targets_backward.json" --benchmark_out_format=json >/dev/null
/usr/bin/python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
merged = json.load(open(f"{out}/targets_forward.json"))
merged["benchmarks"] += json.load(open(f"{out}/targets_backward.json"))["benchmarks"]
json.dump(merged, open(f"{out}/targets.json", "w"), indent=1)
PY
rm "$out/targets_forward.json" "$out/targets_backward.json"
: > "$out/memory.txt"
for policy in none alibi t5 fire; do
  for pass in forward backward; do
    "$build/bench/bench_memory" "$policy" "$memory_length" "$pass" | tee -a "$out/memory.txt"
  done
done
/usr/bin/python3 bench/report.py "$out" "$out/forward.json" "$out/decode.json" "$out/backward.json" "$out/memory.txt"
