#!/usr/bin/env python3
"""Runs every quality-benchmark training run (every scheme, three seeds), two processes at a time.

    python3 bench/quality/run.py BENCH_QUALITY_EXECUTABLE OUT_DIR [--quick | --long | --x16] [--seeds 0,1,2] [--only NAME,...] [-- TEXT_ARGS...]

TEXT_ARGS (e.g. --corpus DIR --held-out-fraction 0.1) go to every run of the text task. --seeds
and --only (plan names: text, small, probe, smallq) redo part of a plan; the rest of OUT_DIR stays.

Writes OUT_DIR/runs/<task>_<scheme>_s<seed>.json (one per run; --long: OUT_DIR/long/, --x16:
OUT_DIR/x16/) and prints, after each run, what
finished, how long it took and an estimate of the time left. Every run is one process with
OMP_NUM_THREADS=1: at this model size (64 x 64 score tiles) two single-threaded processes keep
both cores busier than one process with two threads.
"""
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCHEMES = ["no_bias", "alibi", "sandwich", "kerple_power", "kerple_log", "t5", "per_offset", "fire", "fire_train_L"]
SEEDS = [0, 1, 2]

# name -> (task, extra arguments, relative cost for the time estimate). Text: 4000 steps of 16
# windows of 64 characters = 4.1 M training characters, a warm-up and a cosine decay over them;
# small data: 2400 steps over 5 % of the records (19 passes; the best validation point is kept),
# and the same at a quarter of the budget (600 steps: "smallq"), so the report can tell whether
# the small-data verdict still moved over the last three quarters of the budget; probe: up to
# 3000 steps of 32 sequences at learning rate 0.006, stopping once two curve points reach 0.99
# accuracy (seed 0, Adam's beta2 0.999, T5 / per-offset after 3000 steps: 0.28 / 0.39 at 0.003,
# still rising; 0.88 / 0.90 at 0.006; 0.86 / 0.74 at 0.01; at beta2 0.99 and 0.006: 0.99, solved
# at 2700 steps / 0.75). Longest first, so the two workers finish together.
FULL = {
    "text": ("text", ["--steps", "4000", "--batch", "16", "--eval-every", "250"], 1.0),
    "small": ("text", ["--steps", "2400", "--batch", "16", "--eval-every", "200", "--keep-every", "20"], 0.6),
    "probe": ("probe", ["--steps", "3000", "--batch", "32", "--lr", "0.006", "--eval-every", "100"], 0.6),
    "smallq": ("text", ["--steps", "600", "--batch", "16", "--eval-every", "100", "--keep-every", "20"], 0.17),
}
# The budget check (--long): every scheme, text only, 4x the training (16.4 M characters, the
# schedule stretched over it), three seeds, into OUT_DIR/long/: does the verdict of the main run
# hold when the training is four times longer?
LONG = {
    "long": ("text", ["--steps", "16000", "--batch", "16", "--eval-every", "1000"], 1.0),
}
# The convergence check (--x16): every scheme, text only, 16x the training (65.5 M characters,
# 28 passes), seed 0 unless --seeds, into OUT_DIR/x16/: are the curves flat there, and is the
# order of the schemes the main run's? About 25 minutes on 2 cores for one seed.
X16 = {
    "x16": ("text", ["--steps", "64000", "--batch", "16", "--eval-every", "4000"], 1.0),
}
QUICK = {
    "text": ("text", ["--steps", "40", "--eval-every", "10", "--final-eval-chars", "8192", "--curve-eval-chars", "2048"], 1.0),
    "small": ("text", ["--steps", "40", "--eval-every", "10", "--keep-every", "20", "--final-eval-chars", "8192",
                       "--curve-eval-chars", "2048"], 1.0),
    "probe": ("probe", ["--steps", "40", "--batch", "32", "--lr", "0.006", "--eval-every", "10"], 0.6),
}


def jobs(kind, seeds=None, only=None):
    plan = {"quick": QUICK, "full": FULL, "long": LONG, "x16": X16}[kind]
    if only is not None:
        unknown = set(only) - set(plan)
        if unknown:
            sys.exit(f"run.py: --only {','.join(sorted(unknown))}: not in the {kind} plan ({', '.join(plan)})")
        plan = {name: plan[name] for name in only}
    if seeds is None:
        seeds = SEEDS[:1] if kind in ("quick", "x16") else SEEDS
    return [(name, scheme, seed, *plan[name]) for name in plan for seed in seeds for scheme in SCHEMES]


def main():
    executable, out = sys.argv[1], Path(sys.argv[2])
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    text_args = sys.argv[cut + 1:]
    kind = next((k for k in ("quick", "long", "x16") if f"--{k}" in sys.argv[:cut]), "full")
    runs = out / (kind if kind in ("long", "x16") else "runs")
    runs.mkdir(parents=True, exist_ok=True)
    options = sys.argv[:cut]
    value = lambda flag: options[options.index(flag) + 1].split(",") if flag in options else None
    seeds = value("--seeds")
    todo = jobs(kind, seeds and [int(s) for s in seeds], value("--only"))
    total_cost = sum(job[-1] for job in todo)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    done = {"cost": 0.0, "count": 0}
    print(f"quality: {len(todo)} runs ({kind}), 2 at a time", flush=True)

    def run(job):
        name, scheme, seed, task, extra, cost = job
        path = runs / f"{name}_{scheme}_s{seed}.json"
        t0 = time.time()
        result = subprocess.run([executable, "--task", task, "--scheme", scheme, "--seed", str(seed),
                                 "--out", str(path), *extra,
                                 *(text_args if task == "text" else [])], env=env, capture_output=True, text=True)
        (runs / f"{name}_{scheme}_s{seed}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{name} {scheme} seed {seed} failed:\n{result.stderr}")
        done["cost"] += cost
        done["count"] += 1
        elapsed = time.time() - start
        left = elapsed / done["cost"] * (total_cost - done["cost"])
        print(f"  [{done['count']:2d}/{len(todo)}] {name:5s} {scheme:12s} seed {seed}: {time.time() - t0:5.1f} s"
              f"  ({elapsed:4.0f} s elapsed, about {left:4.0f} s left)", flush=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, todo))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"quality: all runs done in {time.time() - start:.0f} s; their CPU time {cpu:.0f} s "
          f"(about {cpu / 2:.0f} s on two otherwise idle cores)", flush=True)


if __name__ == "__main__":
    main()
