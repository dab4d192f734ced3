#!/usr/bin/env bash
# The main job: installs what is missing, builds the benchmark suite and compares every bias
# scheme (forward sweep, decode, backward, the acceptance checks, peak memory), then writes the
# tables and plots, runs the quality benchmark and prints the per-scheme summary.
# Run as root on Debian 12 from a clone:
#   bash scripts/bench.sh           full run, about 30 minutes: refreshes bench/results/ and the
#                                   results part of bench/README.md (tracked files)
#   QUICK=1 bash scripts/bench.sh   quick run, under two minutes after the build: fewer lengths
#                                   and repetitions, written to build-bench/quick/ (untracked)
#   SPEED_ONLY=1 bash scripts/bench.sh   the speed part alone (about 15 minutes): the quality
#                                   results of the last run stay, each part naming its own run
# Every table and plot names the mode, date, machine, thread count and this command. The
# benchmarks' own output goes to build-bench/logs/<mode>/, the terminal shows one line per stage.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${QUICK:-0}" = 1 ] && quick=1
build=build-bench
if [ $quick = 1 ]; then mode=quick out=$build/quick command="QUICK=1 bash scripts/bench.sh"
else mode=full out=bench/results command="bash scripts/bench.sh"; fi
logs=$build/logs/$mode
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python=python3
[ -x /usr/bin/python3 ] && python=/usr/bin/python3  # Debian's, with Debian's matplotlib and numpy

bash scripts/install-deps.sh

echo "== building $build (Release, -O3 -march=native; the time it took is printed when it ends)"
build_start=$SECONDS
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRELBIAS_BUILD_BENCHMARKS=ON -DRELBIAS_BUILD_TESTS=OFF \
  -DRELBIAS_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j2 2>&1 | sed -u 's/^/   /'
echo "   built in $((SECONDS - build_start)) s"

# Sizes of the two modes. Sweeps repeat every point, interleaved with the other points, so that
# a slow moment of the shared machine hits every policy alike; the report shows the spread.
# Quick: the shortest lengths that still show the trend, minimum times of a few iterations.
if [ $quick = 1 ]; then
  forward_filter='L:(256|1024)/' forward_repetitions=3 forward_min_time=0.05
  decode_filter='Lk:(2048|16384)/' decode_repetitions=3 decode_min_time=0.05
  backward_filter='^backward/.*/L:1024/' backward_repetitions=3 backward_min_time=0.05
  check_length=1024 check_repetitions=5
  memory_length=2048
else
  forward_filter='.*' forward_repetitions=3 forward_min_time=0.2
  decode_filter='.*' decode_repetitions=5 decode_min_time=0.5
  backward_filter='.*' backward_repetitions=3 backward_min_time=0.5
  check_length=4096 check_repetitions=11
  memory_length=32768
fi

quality=1
[ "${SPEED_ONLY:-0}" = 1 ] && quality=0 && command="SPEED_ONLY=1 $command"
stages=6
[ -f scripts/bench-quality.sh ] && [ $quality = 1 ] && stages=$((stages + 1))
[ -f bench/summary.py ] && stages=$((stages + 1))
stage=0
run_start=$SECONDS
begin_stage() {  # title
  stage=$((stage + 1))
  stage_start=$SECONDS
  echo "== [$stage/$stages] $1   ($((SECONDS - run_start)) s into the run)"
}
end_stage() {
  echo "   done in $((SECONDS - stage_start)) s"
}

# Runs one benchmark program with its console output in $logs/<name>.txt, showing a count of the
# finished runs instead.   run_benchmark NAME PROGRAM FILTER REPETITIONS [more flags...]
run_benchmark() {
  local name=$1 program=$build/bench/$2 filter=$3 repetitions=$4
  shift 4
  local total
  total=$(( $("$program" --benchmark_filter="$filter" --benchmark_list_tests | wc -l) * repetitions ))
  local args=(--benchmark_filter="$filter" --benchmark_repetitions="$repetitions"
              --benchmark_enable_random_interleaving=true --benchmark_out_format=json "$@")
  echo "   \$ $program ${args[*]}"
  echo "   $total runs; output in $logs/$name.txt"
  "$program" "${args[@]}" 2>&1 | tee "$logs/$name.txt" | awk -v total="$total" -v tty="$([ -t 1 ] && echo 1)" '
    /real_time / && !/real_time_(mean|median|stddev|cv) / {
      n++
      if (tty) printf "\r   %d/%d runs", n, total
      else if (n == total || n % 25 == 0) printf "   %d/%d runs\n", n, total
      fflush()
    }
    END { if (tty) printf "\n" }'
}

mkdir -p "$out" "$logs"
"$python" - "$out/run.json" "$mode" "$command" "$OMP_NUM_THREADS" "$build" <<'PY'
"""The run's metadata, shown beside every table and plot by bench/report.py."""
import json, subprocess, sys
from datetime import datetime, timezone

path, mode, command, threads, build = sys.argv[1:]

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""

def fields(rows):  # lscpu -J nests some rows under others (Model name -> its cores, ...)
    for row in rows:
        yield row["field"].rstrip(":"), row.get("data") or ""
        yield from fields(row.get("children", []))

cpu = dict(fields(json.loads(run("lscpu", "-J") or '{"lscpu": []}')["lscpu"]))
sockets, cores, smt = (int(cpu.get(k, "1") or 1) for k in ("Socket(s)", "Core(s) per socket", "Thread(s) per core"))
cache = dict(line.split("=", 1) for line in open(f"{build}/CMakeCache.txt") if "=" in line and not line.startswith(("#", "//")))
compiler = cache.get("CMAKE_CXX_COMPILER:FILEPATH", "c++").strip()
commit = run("git", "rev-parse", "--short", "HEAD") or "unknown"
if run("git", "status", "--porcelain", "--untracked-files=no"):
    commit += " + uncommitted changes"
json.dump({
    "mode": mode,
    "command": command,
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "cpu_model": cpu.get("Model name", "unknown CPU"),
    "cores": sockets * cores,
    "threads_per_core": smt,
    "logical_cpus": int(cpu.get("CPU(s)", "0") or 0),
    "threads": int(threads),
    "compiler": run(compiler, "--version").splitlines()[0] if run(compiler, "--version") else compiler,
    "flags": "Release (-O3 -DNDEBUG) -march=native",
    "commit": commit,
}, open(path, "w"), indent=1)
PY

begin_stage "forward sweep: GFLOP/s over sequence lengths, causal and bidirectional, every policy and the reference kernel"
run_benchmark forward bench_forward "$forward_filter" "$forward_repetitions" --benchmark_min_time="$forward_min_time" \
  --benchmark_out="$out/forward.json"
end_stage

begin_stage "decode: one step (1 query) over a KV cache, K and V streamed per second"
run_benchmark decode bench_decode "$decode_filter" "$decode_repetitions" --benchmark_min_time="$decode_min_time" \
  --benchmark_out="$out/decode.json"
end_stage

begin_stage "backward with the bias-parameter gradient"
run_benchmark backward bench_backward "$backward_filter" "$backward_repetitions" \
  --benchmark_min_time="$backward_min_time" --benchmark_out="$out/backward.json"
end_stage

begin_stage "acceptance checks: forward and backward at L = $check_length, bidirectional, $check_repetitions repetitions"
checks="/L:$check_length/causal:0"
run_benchmark checks_forward bench_forward "$checks" "$check_repetitions" --benchmark_min_time="$forward_min_time" \
  --benchmark_out="$logs/checks_forward.json"
run_benchmark checks_backward bench_backward "$checks" "$check_repetitions" \
  --benchmark_min_time="$backward_min_time" --benchmark_out="$logs/checks_backward.json"
"$python" - "$logs/checks_forward.json" "$logs/checks_backward.json" "$out/targets.json" <<'PY'
import json, sys
merged = json.load(open(sys.argv[1]))
merged["benchmarks"] += json.load(open(sys.argv[2]))["benchmarks"]
json.dump(merged, open(sys.argv[3], "w"), indent=1)
PY
end_stage

begin_stage "peak memory of one causal call beyond its tensors, L = $memory_length"
: > "$out/memory.txt"
for policy in none alibi t5 fire; do
  for pass in forward backward; do
    "$build/bench/bench_memory" "$policy" "$memory_length" "$pass" | tee -a "$out/memory.txt" | sed 's/^/   /'
  done
done
end_stage

begin_stage "tables and plots"
readme=()
[ $quick = 0 ] && readme=(--readme bench/README.md)
"$python" bench/report.py "$out" "${readme[@]}"
end_stage

if [ -f scripts/bench-quality.sh ] && [ $quality = 1 ]; then
  begin_stage "quality benchmark (scripts/bench-quality.sh)"
  bash scripts/bench-quality.sh "$out"
  end_stage
fi
if [ -f bench/summary.py ]; then
  begin_stage "summary per scheme (bench/summary.py)"
  "$python" bench/summary.py "$out"
  end_stage
fi

echo "== $mode run finished in $((SECONDS - run_start)) s after the build: $out/results.md and the plots beside it"
