#!/usr/bin/env python3
"""The quality report's verdicts (bench/quality/report.py), on made-up runs, for ctest.

    test_report.py

Checks the sentences the published answer is read from: ties by seed range, a verdict settled
or not between two budgets, learned against heuristic, the budget check's choice of seeds and
setups, and the convergence check's order of schemes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "quality"))
import report  # noqa: E402


def runs_of(values):
    """{scheme: [run per seed]} with eval_bpc = [1x, 16x] from {scheme: [(1x, 16x) per seed]}."""
    return {s: [{"seed": n, "eval_bpc": list(v)} for n, v in enumerate(seeds)] for s, seeds in values.items()}


def check(condition, what):
    if not condition:
        sys.exit(f"test_report: {what}")


def main():
    at_1x = lambda r: r["eval_bpc"][0]
    short = runs_of({"t5": [(2.60, 4.5), (2.61, 4.6)], "per_offset": [(2.62, 4.3), (2.63, 4.4)],
                     "alibi": [(2.75, 2.74), (2.76, 2.75)]})
    check(report.leading_group(short, at_1x) == {"t5"}, "t5 alone leads: the others' ranges are apart")
    same = runs_of({"t5": [(2.40, 4.5), (2.41, 4.6)], "per_offset": [(2.45, 4.3), (2.46, 4.4)],
                    "alibi": [(2.55, 2.5), (2.56, 2.6)]})
    text = report.settled(short, same, at_1x, "v")
    check(text.startswith("v: settled") and "(t5)" in text, f"same leading group: {text}")
    tie = runs_of({"t5": [(2.40, 4.5), (2.43, 4.6)], "per_offset": [(2.42, 4.3), (2.44, 4.4)],
                   "alibi": [(2.55, 2.5), (2.56, 2.6)]})
    text = report.settled(short, tie, at_1x, "v")
    check("the best held (t5)" in text and "per_offset trained 4x longer" in text, f"a tie joins: {text}")
    flipped = runs_of({"t5": [(2.45, 4.5), (2.46, 4.6)], "per_offset": [(2.40, 4.3), (2.41, 4.4)],
                       "alibi": [(2.55, 2.5), (2.56, 2.6)]})
    text = report.settled(short, flipped, at_1x, "v")
    check("**not settled**" in text and "leading group t5 at a quarter" in text, f"the best changes: {text}")
    one_seed = {s: g[:1] for s, g in short.items()}
    check(report.settled(one_seed, same, at_1x, "v") is None, "one seed: no verdict to compare")

    # Learned against heuristic at 16x: ALiBi ahead of the tables at both budgets, apart.
    text = report.family_gap(short, same, -1, "16x")
    check(text.startswith("Learned against heuristic at 16x: heuristic ahead") and text.endswith(": settled"),
          f"heuristic ahead at both budgets: {text}")
    close = runs_of({"t5": [(2.50, 4.5), (2.56, 4.6)], "per_offset": [(2.62, 4.3), (2.63, 4.4)],
                     "alibi": [(2.55, 2.5), (2.57, 2.6)]})
    text = report.family_gap(short, close, 0, "1x")
    check("tie (" in text and "**not settled**" in text, f"learned ahead, then within the spread: {text}")

    # The budget check compares the seeds every scheme has at both budgets (a check still running).
    runs = {("text", s): g for s, g in short.items()}
    runs.update({("long", "t5"): same["t5"], ("long", "per_offset"): same["per_offset"][:1],
                 ("long", "alibi"): same["alibi"]})
    main_runs, long_runs = report.budget_pairs(runs)
    check(all(len(g) == 1 and g[0]["seed"] == 0 for g in list(main_runs.values()) + list(long_runs.values())),
          "budget_pairs keeps seed 0 only, the one every scheme has")

    # A budget check made with another model is left out, not compared; the same setup is kept.
    setup = {"d_model": 32, "heads": 4, "learning_rate": 0.012, "batch": 32, "seq": 64}
    loaded = lambda long_setup: report.drop_other_setups({("text", "t5"): [dict(setup, seed=0)],
                                                          ("long", "t5"): [dict(long_setup, seed=0)]})
    check(("long", "t5") in loaded(dict(setup, steps=8000)), "a longer run of the same setup is kept")
    check(("long", "t5") not in loaded(dict(setup, d_model=64)), "a run of another model size is left out")
    for key in report.SETUP:  # every field of the setup, not only the model size
        check(("long", "t5") not in loaded(dict(setup, **{key: "other"})), f"a run with another {key} is left out")
    check(("text", "t5") in loaded(dict(setup, learning_rate=0.006)), "the main runs stay")
    x16 = report.drop_other_setups({("text", "t5"): [dict(setup, seed=0)], ("x16", "t5"): [dict(setup, batch=16, seed=0)]})
    check(("x16", "t5") not in x16, "the convergence check (x16) of another setup is left out too")

    # The convergence check names the pairs whose order changed when trained 16x longer, at 1x and 16x.
    lengths = {"eval_lengths": [64, 1024], "seq": 64}
    runs = {(name, s): [dict(r, **lengths) for r in g[:1]] for name, groups in (("text", short), ("x16", flipped))
            for s, g in groups.items()}
    at_1x_line, at_16x_line = report.order_lines(runs, "x16")
    check(at_1x_line.startswith("Trained 16x longer (seed 0), at 1x: per_offset 2.400 < t5 2.450 < alibi 2.550")
          and at_1x_line.endswith("1 pair in another order than in the main runs: per_offset now ahead of t5"),
          f"the swap at 1x: {at_1x_line}")
    check(at_16x_line.endswith("the same order as the main runs"), f"no swap at 16x: {at_16x_line}")
    print("test_report: all checks passed")


if __name__ == "__main__":
    main()
