#!/usr/bin/env python3
"""bench_quality end to end on the tiny corpus of tests/data/corpus, for ctest.

    run_bench_quality.py BENCH_QUALITY CORPUS_DIR run|unreadable

run: three training steps on the corpus (and on its small-data thinning); each run's JSON must
hold finite numbers and the corpus fields; a missing --corpus path must fail with its message.
unreadable: a chmod 000 copy of a corpus file must be rejected with "Permission denied". Root
reads any file, so as root bench_quality runs as user nobody (setpriv); without setpriv the
check cannot be made and it exits 77, which ctest reports as skipped.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIPPED = 77


def bench(executable, *args):
    # One thread, as run.py runs it: OpenMP's spinning threads slow a tiny run down on a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=120, env=env)


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")


def check_run(executable, corpus, out, *extra):
    result = bench(executable, "--corpus", str(corpus), "--steps", "3", "--eval-every", "3", "--batch", "2",
                   "--seq", "16", "--final-eval-chars", "512", "--curve-eval-chars", "256", "--out", str(out), *extra)
    check(result.returncode == 0, f"bench_quality {' '.join(extra)} exited {result.returncode}:\n{result.stderr}")
    run = json.loads(out.read_text())
    numbers = run["eval_bpc"] + run["train_loss"] + run["curve_y"]
    check(len(run["eval_bpc"]) == 5 and all(isinstance(x, float) and math.isfinite(x) for x in numbers),
          f"finite bits per character and losses, got {numbers}")
    sizes = {str(p): p.stat().st_size for p in corpus.rglob("*") if p.is_file()}
    check(run["corpus"] == [str(corpus)] and run["corpus_bytes"] == sum(sizes.values()), "the corpus and its size")
    check(run["vocab"] == 256, "vocabulary 256 (bytes)")
    check(sorted(run["train_files"] + run["held_out_files"]) == sorted(sizes), "every file named as training or held out")
    check(run["held_out_chars"] == sum(sizes[f] for f in run["held_out_files"]), "held_out_chars: the held-out files' bytes")
    check(run["split"].startswith("whole files"), f"the split in words, got {run['split']!r}")
    check(all(0 < n <= run["held_out_chars"] - 1 for n in run["eval_scored_chars"]), "tokens scored within the held-out part")
    return run


def run_mode(executable, corpus, tmp):
    full = check_run(executable, corpus, tmp / "run.json")
    check(full["train_chars"] + full["held_out_chars"] == full["corpus_bytes"], "train + held out = the corpus")
    small = check_run(executable, corpus, tmp / "small.json", "--keep-every", "20")
    check(small["train_chars"] == 1024, f"--keep-every 20 keeps the first 1 KiB block, got {small['train_chars']}")
    shaped = check_run(executable, corpus, tmp / "shaped.json", "--d-model", "16", "--heads", "2", "--layers", "1")
    check((shaped["d_model"], shaped["heads"], shaped["layers"]) == (16, 2, 1), "--d-model, --heads, --layers: the model's shape")
    uneven = bench(executable, "--corpus", str(corpus), "--heads", "3", "--check")
    check(uneven.returncode == 1 and "--heads = 3 must divide --d-model = 32" in uneven.stderr,
          f"heads not dividing d_model: exit 1 and its message, got {uneven.returncode}: {uneven.stderr}")
    missing = bench(executable, "--corpus", str(corpus / "no-such-file"), "--check")
    check(missing.returncode == 1 and "no such file or directory" in missing.stderr and "no-such-file" in missing.stderr,
          f"a missing path: exit 1 and its message, got {missing.returncode}: {missing.stderr}")


def unreadable_mode(executable, corpus, tmp):
    copy = tmp / "corpus"
    shutil.copytree(corpus, copy)
    locked = copy / "02-bread.txt"
    locked.chmod(0)
    # Root reads any file: as root, bench_quality runs as the unprivileged user nobody (setpriv,
    # util-linux), for whom the temporary directory is opened up and the locked file stays locked.
    as_user = []
    if os.geteuid() == 0 and shutil.which("setpriv"):
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        tmp.chmod(0o755)
        copy.chmod(0o755)
        if subprocess.run([*as_user, "test", "-x", executable]).returncode != 0:  # e.g. a build below /root
            print(f"SKIPPED: user nobody cannot run {executable} (a parent directory is closed to it): "
                  "the unreadable-file error cannot be provoked here")
            sys.exit(SKIPPED)
    try:
        if os.access(locked, os.R_OK) and not as_user:
            print(f"SKIPPED: {locked} is readable after chmod 000 (running as root, uid {os.geteuid()}, without setpriv): "
                  "the unreadable-file error cannot be provoked here")
            sys.exit(SKIPPED)
        result = subprocess.run([*as_user, executable, "--corpus", str(copy), "--check"], capture_output=True, text=True,
                                timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        check(result.returncode == 1 and "cannot read" in result.stderr and str(locked) in result.stderr
              and "Permission denied" in result.stderr, f"an unreadable file: exit 1 and its message, got {result.stderr}")
    finally:
        locked.chmod(0o644)


def main():
    executable, corpus, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    with tempfile.TemporaryDirectory() as tmp:
        {"run": run_mode, "unreadable": unreadable_mode}[mode](executable, corpus, Path(tmp))
    print(f"{mode}: passed")


if __name__ == "__main__":
    main()
