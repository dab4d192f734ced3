#!/usr/bin/env bash
# The quality benchmark: trains a small character transformer on Debian's fortunes with every
# bias scheme (three seeds, 4.1 M training characters each), evaluates held-out bits per character
# at 1x..16x the training length, trains on 5 % of the data (2400 steps, and 600 to check that the
# verdict has stopped moving), runs the copy-k-back probe, and writes OUT/quality/ (tables, plots,
# every run's JSON, summary.json). About 12 minutes on 2 cores; QUICK=1 well under a minute (a
# smoke test). LONG=1 runs the budget check: every scheme, three seeds, trained 4x longer (about
# 19 minutes), into OUT/quality/long/, kept when the main runs are redone; the report then says
# which verdicts of the main run are settled (the same when trained 4x longer). X16=1 runs the
# convergence check: every scheme, seed 0, trained 16x longer (about 25 minutes), into
# OUT/quality/x16/: are the curves flat there, and is the order of the schemes the same?
# SEEDS=0,1,2 (any plan) runs those seeds only; the x16 check's default is seed 0.
#   bash scripts/bench-quality.sh [OUT | --out OUT]        (OUT defaults to bench/results; QUICK=1: build-bench/quick)
#
# On your own text: --corpus PATH (a file or a directory, read recursively; one or more paths,
# the flag repeatable) replaces the fortunes, read as bytes (vocabulary 256). Held out: the whole
# files named by --held-out FILE..., or else files from the end of the corpus order until
# --held-out-fraction X (default 0.1) of the bytes; a single file holds out its tail. The
# small-data runs keep every 20th 1 KiB block of the training bytes. OUT then defaults to
# build-bench/corpus-NAME (NAME: the first corpus path's base name), not bench/results (the
# committed fortunes run). bench/quality/bench_quality.cpp describes the rules in full.
#   bash scripts/bench-quality.sh --corpus ~/texts --held-out ~/texts/novel.txt
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/bench-quality.sh [OUT | --out OUT] [--corpus PATH ...] [--held-out FILE ... | --held-out-fraction X]"
fail() {
  echo "bench-quality.sh: $1" >&2
  echo "$usage" >&2
  exit 2
}
out=""
corpus=()
held_out=()
fraction=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] && [[ $2 != --* ]] || fail "--out needs a directory"
      out=$2
      shift 2 ;;
    --corpus | --held-out)  # one or more paths, up to the next flag
      flag=$1
      shift
      [ $# -ge 1 ] && [[ $1 != --* ]] || fail "$flag needs a path"
      while [ $# -ge 1 ] && [[ $1 != --* ]]; do
        if [ "$flag" = --corpus ]; then corpus+=("$1"); else held_out+=("$1"); fi
        shift
      done ;;
    --held-out-fraction)
      [ $# -ge 2 ] && [[ $2 != --* ]] || fail "--held-out-fraction needs a number in (0, 1)"
      fraction=("$1" "$2")
      shift 2 ;;
    -h | --help)
      echo "$usage"
      exit 0 ;;
    -*) fail "unknown flag $1" ;;
    *)
      [ -z "$out" ] || fail "a second output directory '$1' (the first: '$out'); to name several corpus paths, put them after --corpus"
      out=$1
      shift ;;
  esac
done
if [ ${#corpus[@]} -eq 0 ] && [ $((${#held_out[@]} + ${#fraction[@]})) -gt 0 ]; then
  fail "--held-out and --held-out-fraction need --corpus (the fortunes have their own held-out files)"
fi
[ ${#held_out[@]} -eq 0 ] || [ ${#fraction[@]} -eq 0 ] || fail "give --held-out or --held-out-fraction, not both"

# bench_quality's arguments for every text run (run.py passes them after "--").
text_args=()
for path in "${corpus[@]}"; do text_args+=(--corpus "$path"); done
for path in "${held_out[@]}"; do text_args+=(--held-out "$path"); done
text_args+=("${fraction[@]}")
if [ -z "$out" ]; then
  out=bench/results
  if [ ${#corpus[@]} -gt 0 ]; then
    name=$(basename "$(realpath -m "${corpus[0]}")")
    out="build-bench/corpus-${name//[^A-Za-z0-9._-]/_}"
  elif [ "${QUICK:-0}" = 1 ]; then
    out=build-bench/quick  # a smoke test never replaces the published runs (as bench.sh's quick run)
  fi
fi
build=build-bench
kind=()
runs=runs  # the folder run.py writes: runs, or the budget check's own
[ "${QUICK:-0}" = 1 ] && kind=(--quick)
[ "${LONG:-0}" = 1 ] && kind=(--long) && runs=long
[ "${X16:-0}" = 1 ] && kind=(--x16) && runs=x16
[ -n "${SEEDS:-}" ] && kind+=(--seeds "$SEEDS")

echo "quality: building bench_quality"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DRELBIAS_BUILD_BENCHMARKS=ON -DRELBIAS_BUILD_TESTS=OFF \
  -DRELBIAS_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" --target bench_quality -j2 >/dev/null
# Reads and splits the corpus once, so that a bad path or split stops here with bench_quality's
# message, before any run.
"$build/bench/bench_quality" --check "${text_args[@]}" || exit 1

rm -rf "${out:?}/quality/$runs"
/usr/bin/python3 bench/quality/run.py "$build/bench/bench_quality" "$out/quality" "${kind[@]}" -- "${text_args[@]}"
command="bash scripts/bench-quality.sh $(printf '%q' "$out")"
[ ${#text_args[@]} -gt 0 ] && command+=" $(printf '%q ' "${text_args[@]}")" && command=${command% }
[ "${QUICK:-0}" = 1 ] && command="QUICK=1 $command"
[ "${LONG:-0}" = 1 ] && command="LONG=1 $command"
[ -n "${SEEDS:-}" ] && command="SEEDS=$SEEDS $command"
[ "${X16:-0}" = 1 ] && command="X16=1 $command"
echo "$command" >"$out/quality/$runs/command.txt"  # the report names each part's own command
/usr/bin/python3 bench/quality/report.py "$out/quality"
