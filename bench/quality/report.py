#!/usr/bin/env python3
"""Tables, plots and summary.json of the quality benchmark.

    python3 bench/quality/report.py OUT_DIR ["COMMAND"]     (default: OUT_DIR/runs/command.txt)

Reads OUT_DIR/runs/*.json (bench/quality/run.py), writes OUT_DIR/quality.md, OUT_DIR/*.png and
OUT_DIR/summary.json, and, when OUT_DIR/../../README.md has the quality markers (the committed
run: OUT_DIR = bench/results/quality), rewrites that part of it. Every number is the mean over
seeds with [min, max] beside it.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SCHEMES = ["no_bias", "alibi", "sandwich", "kerple_power", "kerple_log", "t5", "per_offset", "fire", "fire_train_L"]
HEURISTIC = ["alibi", "sandwich"]
LEARNED = ["kerple_power", "kerple_log", "t5", "per_offset", "fire", "fire_train_L"]
FLAT_BPC = 0.02       # converged: the last quarter of training improved validation bpc by less than this
FLAT_ACCURACY = 0.01  # the probe's plateau: the last quarter raised accuracy by less than this
SOLVED = 0.99         # the probe is solved at this accuracy (bench_quality stops there)
COLORS = dict(zip(SCHEMES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
CLIP = -20  # bias axis floor in the bias plots
BEGIN, END = "<!-- quality: begin (bench/quality/report.py writes this part) -->", "<!-- quality: end -->"


def load_runs(out):
    """(name, scheme) -> runs sorted by seed; name: text, small, smallq (small data at a quarter of
    the budget), probe, long and x16 (the budget checks, OUT_DIR/long/ and OUT_DIR/x16/, kept when
    the main runs are redone)."""
    runs = defaultdict(list)
    kept = [out / "runs"] + [out / name for name in LATER]
    for path in [p for folder in kept for p in sorted(folder.glob("*.json"))]:
        run = json.loads(path.read_text())
        runs[(path.name.split("_")[0], run["scheme"])].append(run)
    for key in runs:
        runs[key].sort(key=lambda r: r["seed"])
    return drop_other_setups(runs)


# The budget checks: the main text runs trained longer, each in OUT_DIR/<name>/, with its factor.
LATER = {"long": 4, "x16": 16}

# What a run of the budget check must share with the main runs to be compared with them (all but
# the number of steps and how often the curve is read).
SETUP = ("batch", "seq", "learning_rate", "warmup_fraction", "final_lr_fraction", "beta2", "d_model", "heads", "layers",
         "vocab", "corpus_bytes", "split")


def drop_other_setups(runs):
    """Leaves out a budget check's runs (long, x16) when their model, schedule or corpus differ from
    the main text runs' (a check made before the benchmark changed): the report would otherwise
    read two experiments as one. Says so on stderr."""
    setup = lambda run: tuple(run.get(key) for key in SETUP)
    main = {setup(r) for (name, _), group in runs.items() if name == "text" for r in group}
    values = lambda setups, i: sorted({str(t[i]) for t in setups})
    for later in LATER:
        other = {setup(r) for (name, _), group in runs.items() if name == later for r in group} - main
        if main and other:
            differs = [f"{key} {values(other, i)} ({later}) against {values(main, i)} (main)"
                       for i, key in enumerate(SETUP) if values(other, i) != values(main, i)]
            print(f"report.py: the budget check's runs ({later}/) were made with another setup, left out: "
                  f"{'; '.join(differs)}", file=sys.stderr)
            runs = defaultdict(list, {key: group for key, group in runs.items() if key[0] != later})
    return runs


def spread(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def machine():
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def command_of(runs_dir, fallback):
    """The command that wrote runs_dir (bench-quality.sh leaves it in command.txt)."""
    path = runs_dir / "command.txt"
    return path.read_text().strip() if path.exists() else fallback


def commit():
    """The checkout's commit, "+changes" when its code differs from it (the results that a run
    writes, bench/results and bench/README.md, do not count)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/results", ":!bench/README.md"], capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- Convergence and ties --------------------------------------------------------------------

def last_quarter_gain(run, probe):
    """How much the last quarter of training improved the best validation value: bits per
    character gained (text), accuracy gained (probe). Small: the curve had flattened."""
    x, y = np.array(run["curve_x"]), np.array(run["curve_y"])
    late = x > 0.75 * x[-1]
    if late.all() or not late.any():
        return float("nan")
    if probe:
        return float(y[late].max() - y[~late].max())
    return float(y[~late].min() - y[late].min())


def solved_at(run):
    """Training sequences seen when the probe first reached SOLVED accuracy, or None."""
    for x, y in zip(run["curve_x"], run["curve_y"]):
        if y >= SOLVED:
            return x
    return None


def converged(run, probe):
    if probe and solved_at(run) is not None:
        return True
    gain = last_quarter_gain(run, probe)
    return bool(np.isfinite(gain) and gain < (FLAT_ACCURACY if probe else FLAT_BPC))


def ranking(groups, value_of, lower_is_better=True):
    """{scheme: "best" | "tie" | ""}: the best mean, and the schemes whose range over seeds
    overlaps the best one's (the difference is within the seed spread: a tie)."""
    values = {scheme: [value_of(r) for r in group] for scheme, group in groups.items() if group}
    if not values:
        return {}
    sign = 1 if lower_is_better else -1
    best = min(values, key=lambda scheme: sign * np.mean(values[scheme]))
    lo, hi = min(values[best]), max(values[best])
    marks = {}
    for scheme, v in values.items():
        overlaps = min(v) <= hi and max(v) >= lo
        marks[scheme] = "best" if scheme == best else ("tie" if overlaps else "")
    return marks


def tied_with_best(marks):
    best = [s for s, m in marks.items() if m == "best"]
    return best[0] if best else None, [s for s, m in marks.items() if m == "tie"]


MARK = {"best": " **best**", "tie": " (tie)", "": ""}


def groups_of(runs, name):
    return {scheme: runs.get((name, scheme), []) for scheme in SCHEMES if runs.get((name, scheme))}


# ---- Tables ----------------------------------------------------------------------------------

def text_table(runs, name):
    groups = groups_of(runs, name)
    if not groups:
        return []
    first = next(iter(groups.values()))[0]
    lengths = first["eval_lengths"]
    marks = [ranking(groups, lambda r, k=k: r["eval_bpc"][k]) for k in range(len(lengths))]
    base = np.mean([r["cpu_ms_per_step"] for r in groups.get("no_bias", [])]) if "no_bias" in groups else None
    lines = ["| scheme | bias params | CPU ms/step (x no bias) | converged | " +
             " | ".join(f"bpc at {n} ({n // first['seq']}x)" for n in lengths) + " |",
             "|---" * (4 + len(lengths)) + "|"]
    for scheme, group in groups.items():
        ms = [r["cpu_ms_per_step"] for r in group]
        cost = spread(ms, 1) + (f" ({np.mean(ms) / base:.2f}x)" if base else "")
        flat = f"{sum(converged(r, False) for r in group)}/{len(group)}"
        cells = [spread([r["eval_bpc"][k] for r in group]) + MARK[marks[k].get(scheme, "")] for k in range(len(lengths))]
        lines.append(f"| {scheme} | {group[0]['bias_parameters']} | {cost} | {flat} | " + " | ".join(cells) + " |")
    return lines


def convergence_table(runs, name, probe):
    """Per scheme and seed: the last quarter's gain (and, for the probe, where it was solved)."""
    groups = groups_of(runs, name)
    if not groups:
        return []
    seeds = sorted({r["seed"] for g in groups.values() for r in g})
    unit = "accuracy" if probe else "bpc"
    lines = ["| scheme | " + " | ".join(f"seed {s}: last-quarter gain ({unit})" for s in seeds) +
             " | best point at (of the run) |", "|---" * (2 + len(seeds)) + "|"]
    for scheme, group in groups.items():
        cells = []
        for r in group:
            gain = last_quarter_gain(r, probe)
            where = solved_at(r) if probe else None
            text = f"solved at {where:,.0f} seq." if where is not None else f"{gain:+.3f}"
            cells.append(text + (" flat" if converged(r, probe) else " **still moving**"))
        best = spread([r["best_x"] / r["curve_x"][-1] for r in group], 2)
        lines.append(f"| {scheme} | " + " | ".join(cells) + f" | {best} |")
    return lines


def probe_table(runs):
    groups = groups_of(runs, "probe")
    if not groups:
        return []
    marks = ranking(groups, lambda r: r["probe_accuracy"], lower_is_better=False)
    lines = ["| scheme | bias params | test accuracy (best validation point) | runs solved (>= 0.99) | sequences to solve | steps run |",
             "|---" * 6 + "|"]
    for scheme, group in groups.items():
        solved = [solved_at(r) for r in group]
        done = [x for x in solved if x is not None]
        lines.append(f"| {scheme} | {group[0]['bias_parameters']} | {spread([r['probe_accuracy'] for r in group])}"
                     f"{MARK[marks.get(scheme, '')]} | {len(done)}/{len(group)} | {spread(done, 0) if done else '-'} | "
                     f"{spread([r['steps_run'] for r in group], 0)} |")
    return lines


def folder_date(folder):
    paths = list(folder.glob("*.json"))
    stamp = max(path.stat().st_mtime for path in paths) if paths else 0
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def budget_check(runs, out, name="long"):
    """The main runs beside the same runs trained LATER[name] times longer (OUT_DIR/<name>/), on
    the seeds both have."""
    short, long = budget_pairs(runs, name)
    if not short:
        return []
    first_long, first_short = next(iter(long.values()))[0], next(iter(short.values()))[0]
    seeds = sorted({r["seed"] for g in long.values() for r in g})
    chars = lambda r: r["steps"] * r["batch"] * r["seq"] / 1e6
    later = f"{LATER[name]}x longer"
    lines = [f"Seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: the main runs ({chars(first_short):.1f} M training "
             f"characters) beside the same runs trained on {chars(first_long):.1f} M, the schedule stretched over it "
             f"(`{command_of(out / name, name.upper() + '=1')}`, {folder_date(out / name)}). **best** and (tie) as above, "
             "within each column" + (" (one seed: no ties can be told from noise)." if len(seeds) < 2 else "."), "",
             f"| scheme | bpc 1x, main | bpc 1x, {later} | bpc 16x, main | bpc 16x, {later} | {later}: last-quarter gain |",
             "|---" * 6 + "|"]
    marks = [ranking(g, lambda r, k=k: r["eval_bpc"][k]) for k in (0, -1) for g in (short, long)]
    for scheme in long:
        cells = [spread([r["eval_bpc"][k] for r in g[scheme]]) + MARK[m.get(scheme, "")]
                 for (k, g), m in zip([(0, short), (0, long), (-1, short), (-1, long)], marks)]
        gains = [last_quarter_gain(r, False) for r in long[scheme]]
        flat = sum(converged(r, False) for r in long[scheme])
        lines.append(f"| {scheme} | " + " | ".join(cells) + f" | {spread(gains)} ({flat}/{len(gains)} flat) |")
    return lines


def budget_pairs(runs, name="long"):
    """{scheme: main runs}, {scheme: longer runs}, on the schemes and seeds the budget check ran."""
    long, text = groups_of(runs, name), groups_of(runs, "text")
    if not long or not text:
        return {}, {}
    # The seeds every scheme has at both budgets (a budget check still running has some schemes ahead).
    seeds = set.intersection(*({r["seed"] for r in g} for g in list(long.values()) + [text[s] for s in long if s in text]))
    pick = lambda g: [r for r in g if r["seed"] in seeds]
    return {s: pick(text[s]) for s in long if s in text}, {s: pick(g) for s, g in long.items() if s in text}


def leading_group(groups, value_of):
    """The best scheme and those within its seed spread, as a set; empty when one seed leaves no spread."""
    return leader_and_group(groups, value_of)[1]


def leader_and_group(groups, value_of):
    """(best scheme, leading group) from one ranking; (None, empty) when one seed leaves no spread."""
    if any(len(g) < 2 for g in groups.values()):
        return None, set()
    marks = ranking(groups, value_of)
    return tied_with_best(marks)[0], {s for s, m in marks.items() if m}


def settled(short, long, value_of, what, later="trained 4x longer", earlier="at a quarter of the budget"):
    """One sentence: does the longer training name the same leading group (best + ties) as the shorter?"""
    (best_a, a), (best_b, b) = leader_and_group(short, value_of), leader_and_group(long, value_of)
    if not a or not b:
        return None
    names = lambda group: ", ".join(sorted(group, key=SCHEMES.index)) or "none"
    if a == b:
        return f"{what}: settled, the same leading group at both budgets ({names(b)})"
    if best_a == best_b:
        return (f"{what}: the best held ({best_b}); **the ties moved**: within its seed spread {names(b - {best_b})} "
                f"{later}, {names(a - {best_a})} {earlier}")
    return f"{what}: **not settled**: leading group {names(a)} {earlier}, {names(b)} {later}"


def budget_verdicts(runs, name="long"):
    """A budget check's sentences for the answer: is each column's verdict the same when trained
    LATER[name] times longer?"""
    short, long = budget_pairs(runs, name)
    if not short:
        return []
    factor, seeds = LATER[name], len(next(iter(long.values())))
    if seeds < 2:
        return [f"Trained {factor}x longer: one seed only, so no verdict can be compared"]
    lengths = next(iter(long.values()))[0]["eval_lengths"]
    seq = next(iter(long.values()))[0]["seq"]
    later, earlier = f"trained {factor}x longer", f"at 1/{factor} of the budget"
    lines = [best_sentence(long, lambda r, k=k: r["eval_bpc"][k],
                           f"Trained {factor}x longer ({seeds} seeds), at {lengths[k] // seq}x") for k in (0, -1)]
    lines += [settled(short, long, lambda r, k=k: r["eval_bpc"][k], f"Verdict at {lengths[k] // seq}x, main against "
                      f"{factor}x longer", later, earlier) for k in (0, -1)]
    lines += [family_gap(short, long, k, f"{lengths[k] // seq}x", ("main", later)) for k in (0, -1)]
    gains = [last_quarter_gain(r, False) for g in long.values() for r in g]
    flat = sum(converged(r, False) for g in long.values() for r in g)
    lines.append(f"The {factor}x runs' last-quarter gains: {min(gains):.3f} to {max(gains):.3f} bpc "
                 f"({flat} of {len(gains)} flat by the criterion)")
    return lines


def order_lines(runs, name="x16"):
    """The main runs' order of schemes beside the order trained LATER[name] times longer, on the
    seeds both have, at 1x and at the longest length: which pairs swapped."""
    short, long = budget_pairs(runs, name)
    if not short:
        return []
    lengths, seq = next(iter(long.values()))[0]["eval_lengths"], next(iter(long.values()))[0]["seq"]
    seeds = ", ".join(map(str, sorted({r["seed"] for g in long.values() for r in g})))
    lines = []
    for k in (0, -1):
        mean = lambda groups, s: float(np.mean([r["eval_bpc"][k] for r in groups[s]]))
        order = lambda groups: sorted(long, key=lambda s: mean(groups, s))
        a, b = order(short), order(long)
        swapped = [(x, y) for i, x in enumerate(a) for y in a[i + 1:] if b.index(x) > b.index(y)]
        text = " < ".join(f"{s} {mean(long, s):.3f}" for s in b)
        moved = ("the same order as the main runs" if not swapped else
                 f"{len(swapped)} pair{'s' * (len(swapped) > 1)} in another order than in the main runs: " +
                 ", ".join(f"{y} now ahead of {x}" for x, y in swapped))
        lines.append(f"Trained {LATER[name]}x longer (seed {seeds}), at {lengths[k] // seq}x: {text}; {moved}")
    return lines


def family_gap(short, long, k, label, budgets=("main", "4x longer")):
    """The project's question at one length: the best learned scheme against the best heuristic
    one, at both budgets. Settled when the same family wins at both with the ranges apart."""
    def best_of(groups, family):
        values = {s: [r["eval_bpc"][k] for r in groups[s]] for s in family if s in groups}
        scheme = min(values, key=lambda s: np.mean(values[s]))
        return scheme, values[scheme]
    parts, verdicts = [], []
    for groups, budget in zip((short, long), budgets):
        (learned, a), (heuristic, b) = best_of(groups, LEARNED), best_of(groups, HEURISTIC)
        apart = max(a) < min(b) or max(b) < min(a)
        verdicts.append(("learned" if np.mean(a) < np.mean(b) else "heuristic") if apart else "tie")
        parts.append(f"{budget} {learned} {np.mean(a):.3f} against {heuristic} {np.mean(b):.3f}")
    state = "settled" if verdicts[0] == verdicts[1] else "**not settled**"
    outcome = verdicts[1] if verdicts[1] == "tie" else f"{verdicts[1]} ahead"
    return f"Learned against heuristic at {label}: {outcome} ({'; '.join(parts)}): {state}"


def speed_lines(runs):
    """Each run probes the one-thread FMA peak as it starts, per second of its CPU time as its
    step rate is, so each run's own fraction holds even when runs share the machine."""
    groups = groups_of(runs, "text")
    if not groups:
        return []
    probes = [r["fma_peak_gflops_1_thread"] for name in ("text", "small", "probe") for g in groups_of(runs, name).values()
              for r in g]
    lines = [f"One-thread FMA peak per CPU second: median {float(np.median(probes)):.0f} GFLOP/s over the {len(probes)} "
             f"runs' start-up probes (range {min(probes):.0f}-{max(probes):.0f}); each run's fraction uses its own probe. "
             "Step FLOPs: the model's matrix products and the attention's visible query-key pairs, forward and backward "
             "(bench/quality/experiment.hpp).", "",
             "| scheme | CPU ms/step | step GFLOP/s | fraction of the one-thread FMA peak |", "|---" * 4 + "|"]
    for scheme, group in groups.items():
        lines.append(f"| {scheme} | {spread([r['cpu_ms_per_step'] for r in group], 1)} | "
                     f"{spread([r['step_gflops'] for r in group], 0)} | {spread([r['peak_fraction'] for r in group], 2)} |")
    return lines


# ---- Plots -----------------------------------------------------------------------------------

def stamp(fig, footer):
    """The footer under the panels, wrapped to the figure's width (a narrow figure cut it off)."""
    lines = textwrap.wrap(footer, width=int(fig.get_figwidth() * 19))
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=7, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.015 + 0.022 * len(lines), 1, 1))


def band_plot(ax, runs, name, x_of, y_of, label_x, label_y):
    for scheme in SCHEMES:
        group = runs.get((name, scheme), [])
        if not group:
            continue
        x = np.array(x_of(group[0]), dtype=float)
        ys = [np.array(y_of(r), dtype=float) for r in group]
        n = min(len(y) for y in ys)  # a solved probe run stops early
        ys = np.array([y[:n] for y in ys])
        ax.plot(x[:n], ys.mean(axis=0), marker="o", markersize=2, color=COLORS[scheme], label=scheme,
                linestyle="--" if scheme in HEURISTIC or scheme == "no_bias" else "-")
        if len(group) > 1:
            ax.fill_between(x[:n], ys.min(axis=0), ys.max(axis=0), color=COLORS[scheme], alpha=0.2)
    ax.set_xlabel(label_x)
    ax.set_ylabel(label_y)
    ax.grid(alpha=0.3)


PANELS = [("text", "all training files"), ("long", "all training files, 4x longer"), ("x16", "all training files, 16x longer"),
          ("small", "every 20th training record (5 %)")]


def plot_text_panels(runs, out, file, title, x_of, y_of, label_x, label_y, log_x, footer, zoom_first=None):
    """One panel each for the runs on all training files, the same trained 4x longer (when the
    budget check ran) and the small-data runs; each panel scales to its own data (a shared axis
    had cut off the small-data curves)."""
    panels = [(name, data) for name, data in PANELS if any(runs.get((name, s)) for s in SCHEMES)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    axes = axes[0]
    for ax, (name, data) in zip(axes, panels):
        band_plot(ax, runs, name, x_of, y_of, label_x, label_y)
        if log_x:
            ax.set_xscale("log", base=2)
        if zoom_first is not None:
            ys = [v for s in SCHEMES for r in runs.get((name, s), []) for v in y_of(r)[zoom_first:]]
            if ys:
                ax.set_ylim(min(ys) - 0.05, max(ys) + 0.05)
        ax.set_title(f"{title}: {data}")
    axes[0].legend(fontsize=8)
    stamp(fig, footer)
    fig.savefig(out / file, dpi=110)
    plt.close(fig)


def plot_probe(runs, out, footer):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    band_plot(ax, runs, "probe", lambda r: r["curve_x"], lambda r: r["curve_y"], "training sequences seen",
              "probe accuracy (fraction of positions)")
    ax.axhline(1 / 16, color="gray", linestyle=":", label="chance (1/16)")
    ax.axhline(SOLVED, color="black", linestyle=":", linewidth=0.8, label=f"solved ({SOLVED})")
    ax.set_ylim(0, 1.02)
    ax.set_title("Copy the symbol k = 5..9 back (length 32)")
    ax.legend(fontsize=8)
    stamp(fig, footer)
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)


def plot_biases(runs, out, name, file, log_x, footer):
    shown_schemes = LEARNED + ["sandwich"]
    alibi = runs.get((name, "alibi"))
    fig, axes = plt.subplots(1, len(shown_schemes), figsize=(3.6 * len(shown_schemes), 3.9))
    for ax, scheme in zip(axes, shown_schemes):
        group = runs.get((name, scheme))
        if not group:
            ax.set_visible(False)
            continue
        run = group[0]
        heads = np.array(run["bias_by_distance"])
        distance = np.arange(heads.shape[1])
        shown = distance >= 1 if log_x else distance >= 0
        for h, values in enumerate(heads):
            ax.plot(distance[shown], values[shown], label=f"head {h}")
        if alibi:
            for h, values in enumerate(np.array(alibi[0]["bias_by_distance"])):
                ax.plot(distance[shown], values[shown], color="gray", linestyle="--", linewidth=0.8,
                        label="ALiBi" if h == 0 else None)
        if log_x:
            ax.set_xscale("log", base=2)
            ax.axvline(run["seq"], color="black", linestyle=":", linewidth=0.8, label="training length")
        else:
            ax.axvspan(5, 9, color="yellow", alpha=0.2, label="k = 5..9")
        # Below -20 a key's weight is under e^-20 = 2e-9 of the row's, as good as masked, so the
        # axis stops there (KERPLE power reaches -1e6 at 1024).
        hi = heads[:, shown].max()
        ax.set_ylim(max(heads[:, shown].min(), CLIP) - 0.5, max(hi, 1) + 0.5)
        ax.set_title(f"{scheme} (seed {run['seed']}, query at {run['bias_query_position']})", fontsize=9)
        ax.set_xlabel("distance i - j" + (" (log scale)" if log_x else ""))
        ax.set_ylabel(f"bias (nats, clipped at {CLIP})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    stamp(fig, footer)
    fig.savefig(out / file, dpi=110)
    plt.close(fig)


def plot_losses(runs, out, footer):
    names = [n for n in ["text", "long", "x16", "small", "smallq", "probe"] if any(runs.get((n, s)) for s in SCHEMES)]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.6), squeeze=False)
    styles = ["-", "--", ":"]
    for ax, name in zip(axes[0], names):
        for scheme in SCHEMES:
            for run in runs.get((name, scheme), []):
                loss = np.array(run["train_loss"])
                window = max(1, len(loss) // 40)  # a running mean, so the seeds' lines stay readable
                smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(len(smooth)) + window, smooth, color=COLORS[scheme], linewidth=0.8,
                        linestyle=styles[run["seed"] % 3], label=scheme if run["seed"] == 0 else None)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats per predicted token)")
        ax.set_title(f"Every run's training loss: {name} (seeds: - -- :)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    stamp(fig, footer)
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


# ---- The answer --------------------------------------------------------------------------------

def best_sentence(groups, value_of, what, lower_is_better=True, digits=3):
    marks = ranking(groups, value_of, lower_is_better)
    best, ties = tied_with_best(marks)
    if best is None:
        return None
    mean = np.mean([value_of(r) for r in groups[best]])
    text = f"{what}: **{best}** ({mean:.{digits}f})"
    if len(groups[best]) < 2:
        text += "; one seed, so no spread to tell a difference from noise"
    elif ties:
        text += "; within the seed spread of it: " + ", ".join(
            f"{s} ({np.mean([value_of(r) for r in groups[s]]):.{digits}f})" for s in ties)
    else:
        text += "; every other scheme is outside its seed range"
    return text


def answer(runs, quick=False):
    """The run's answer, read off its numbers only."""
    lines = []
    text, small, probe = groups_of(runs, "text"), groups_of(runs, "small"), groups_of(runs, "probe")
    if text:
        lengths = next(iter(text.values()))[0]["eval_lengths"]
        seq = next(iter(text.values()))[0]["seq"]
        for multiple in (1, 8, 16):
            if multiple * seq in lengths:
                k = lengths.index(multiple * seq)
                lines.append(best_sentence(text, lambda r, k=k: r["eval_bpc"][k],
                                           f"Held-out bits per character at {multiple}x the training length"))
    if small:
        steps = next(iter(small.values()))[0]["steps"]
        lengths = next(iter(small.values()))[0]["eval_lengths"]
        for k in (0, -1):
            lines.append(best_sentence(small, lambda r, k=k: r["eval_bpc"][k],
                                       f"On 5 % of the data ({steps} steps), at {lengths[k]} characters"))
        quarter = groups_of(runs, "smallq")
        if quarter:
            q_steps = next(iter(quarter.values()))[0]["steps"]
            for k in (0, -1):
                lines.append(settled(quarter, small, lambda r, k=k: r["eval_bpc"][k],
                                     f"Small-data verdict at {lengths[k]} characters, {q_steps} against {steps} steps",
                                     later="at the full budget"))
            for k in (0, -1):
                lines.append(family_gap(quarter, small, k, f"{lengths[k]} characters on 5 % of the data",
                                        (f"{q_steps} steps", f"{steps} steps")))
    if probe:
        lines.append(best_sentence(probe, lambda r: r["probe_accuracy"], "Probe accuracy (copy k = 5..9 back)",
                                   lower_is_better=False))
    if text:
        base = np.mean([r["cpu_ms_per_step"] for r in text.get("no_bias", [])]) if "no_bias" in text else None
        costs = [f"{s} {np.mean([r['cpu_ms_per_step'] for r in g]):.1f} ms" +
                 (f" ({np.mean([r['cpu_ms_per_step'] for r in g]) / base:.2f}x)" if base else "") for s, g in text.items()]
        lines.append("Cost, CPU ms per training step (one thread, x no bias): " + ", ".join(costs))
        if quick:  # 40 steps sit on the first plateau: a flat curve there is not convergence
            lines.append("Convergence: not read in a quick run (its curves stop on the first plateau)")
        else:
            counts = []
            for name, label in (("text", "all-data"), ("small", "small-data"), ("long", "all-data 4x longer"),
                                ("x16", "all-data 16x longer")):
                group = [r for g in groups_of(runs, name).values() for r in g]
                if group:
                    gains = [last_quarter_gain(r, False) for r in group]
                    counts.append(f"{sum(converged(r, False) for r in group)} of {len(group)} {label} runs "
                                  f"(last-quarter gains {min(gains):.3f} to {max(gains):.3f} bpc)")
            lines.append(f"Converged by the criterion (last quarter gained < {FLAT_BPC} bpc): " + "; ".join(counts))
        lines += budget_verdicts(runs, "long") + budget_verdicts(runs, "x16") + order_lines(runs, "x16")
    return [line for line in lines if line]


def summary(runs, answer_lines, quick):
    per_scheme = {}
    for scheme in SCHEMES:
        text, probe = runs.get(("text", scheme), []), runs.get(("probe", scheme), [])
        entry = {}
        if text:
            lengths = text[0]["eval_lengths"]
            entry["bias_parameters"] = text[0]["bias_parameters"]
            entry["train_ms_per_step"] = float(np.mean([r["cpu_ms_per_step"] for r in text]))  # CPU time, one thread
            entry["train_wall_ms_per_step"] = float(np.mean([r["ms_per_step"] for r in text]))
            entry["step_gflops"] = float(np.mean([r["step_gflops"] for r in text]))
            entry["bpc_1x"] = float(np.mean([r["eval_bpc"][0] for r in text]))
            for multiple in (8, 16):
                if multiple * text[0]["seq"] in lengths:
                    entry[f"bpc_{multiple}x"] = float(np.mean([r["eval_bpc"][lengths.index(multiple * text[0]["seq"])] for r in text]))
            entry["converged_runs"] = sum(converged(r, False) for r in text)
        small = runs.get(("small", scheme), [])
        if small:
            entry["small_data_bpc_1x"] = float(np.mean([r["eval_bpc"][0] for r in small]))
        if probe:
            entry["probe_accuracy"] = float(np.mean([r["probe_accuracy"] for r in probe]))
        entry["seeds"] = len(text)
        per_scheme[scheme] = entry
    return {"quick": quick, "answer": [a.replace("**", "") for a in answer_lines], "schemes": per_scheme}


def setup_lines(runs):
    text = next((runs[("text", s)][0] for s in SCHEMES if runs.get(("text", s))), None)
    small = next((runs[("small", s)][0] for s in SCHEMES if runs.get(("small", s))), None)
    probe = next((runs[("probe", s)][0] for s in SCHEMES if runs.get(("probe", s))), None)
    lines = []
    if text:
        lines.append(f"Model: {text['layers']} pre-LN blocks, d_model {text['d_model']}, {text['heads']} heads of "
                     f"{text['d_model'] // text['heads']}, MLP 4x (GELU), tied embedding ({text['vocab']} symbols), "
                     f"{text['model_parameters']:,} weights, no absolute positions; one bias policy shared by both layers. "
                     f"Adam (beta2 {text.get('beta2', 0.999)}), peak learning rate {text['learning_rate']} (the probe {probe['learning_rate'] if probe else '-'}), "
                     f"linear warm-up over the first {text['warmup_fraction']:.0%} of the steps, then a cosine down to "
                     f"{text['final_lr_fraction']:.0%} of the peak: the same for every scheme. Float, relbias's fused forward "
                     "and backward, one thread per run, two runs at a time. CPU ms/step: the process's CPU time per step "
                     "(forward, backward, Adam).")
        corpus = ", ".join(text.get("corpus", ["/usr/share/games/fortunes"]))
        symbols = "bytes" if text["vocab"] == 256 else "characters"
        lines.append(f"Text: `{corpus}` ({text.get('corpus_bytes', 0):,} bytes), read as {symbols} ({text['vocab']} symbols); "
                     f"split: {text.get('split', 'fortune files ' + ', '.join(text['held_out_files']))}: "
                     f"{text['train_chars']:,} training {symbols}, {text['held_out_chars']:,} held out. The learning "
                     f"curve and the choice of the weights evaluated (the best curve point) use the last "
                     f"{text['curve_eval_chars']:,} held-out characters (validation); the final numbers score the first "
                     f"{text['final_eval_chars']:,} (test){' — overlapping: the held-out text is short' if text['validation_overlaps_test'] else ''}, "
                     "at every length, in non-overlapping windows (contexts 0 .. length - 1). "
                     f"Training: {text['steps']} steps of {text['batch']} random windows of {text['seq']} characters "
                     f"({text['steps'] * text['batch'] * text['seq']:,} characters), the same windows in the same order for "
                     "every scheme of a seed.")
    if small:
        part = "1 KiB block of the training bytes" if small["vocab"] == 256 else "training record"
        lines.append(f"Small data: every {small['keep_every']}th {part} ({small['train_chars']:,} symbols), {small['steps']} steps "
                     f"({small['steps'] * small['batch'] * small['seq'] / small['train_chars']:.1f} passes over it); "
                     "the best validation point is evaluated (early stopping); the same runs at a quarter of the "
                     "budget (smallq) tell whether the verdict still moved.")
    if probe:
        lines.append(f"Probe: sequences of {probe['seq']} random symbols (16), each token also carrying k in 5..9 for its "
                     f"sequence; target at position t >= k is the symbol at t - k. Up to {probe['steps']} steps of "
                     f"{probe['batch']} fresh sequences, stopping once two curve points reach {SOLVED}; the curve (and the "
                     "choice of the weights) on 512 fixed validation sequences, the accuracy reported on 512 other fixed "
                     "test sequences (chance 1/16).")
    lines.append(f"Converged: a run whose last quarter of training improved its best validation bits per character by "
                 f"less than {FLAT_BPC} (the probe: solved, or accuracy up by less than {FLAT_ACCURACY}). Ties: a "
                 "difference is read only where the seeds' ranges [min, max] do not overlap; **best** marks the best "
                 "mean of a column, (tie) a scheme whose range overlaps the best one's. Settled: a verdict (the best "
                 "scheme and those tied with it) that is the same at a quarter of the training budget (the main text "
                 "runs against the budget check's runs trained 4x longer; the small-data runs against their quarter "
                 "budget): the runs' bits per character still fall, but the answer no longer moves.")
    return lines


def main():
    out = Path(sys.argv[1])
    command = command_of(out / "runs", sys.argv[2] if len(sys.argv) > 2 else "bash scripts/bench-quality.sh")
    quick = "QUICK=1" in command
    runs = load_runs(out)
    if not runs:
        sys.exit(f"report.py: no runs in {out / 'runs'}")
    last_run = max(path.stat().st_mtime for path in (out / "runs").glob("*.json"))  # when the run ended
    date = datetime.datetime.fromtimestamp(last_run, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = sorted({r["seed"] for group in runs.values() for r in group})
    kind = "QUICK run: a smoke test, not an answer" if quick else "full run"
    # The budget checks' panels come from their own runs: their commands and dates beside the main one's.
    later = [f"{command_of(out / name, name)} (ended {folder_date(out / name)})" for name in LATER
             if any(runs.get((name, s)) for s in SCHEMES)]
    footer = f"{kind} | runs ended {date} | {machine()} | report at commit {commit()} | " + "; ".join([command] + later)

    plot_text_panels(runs, out, "extrapolation.png", "Train at 64, test longer", lambda r: r["eval_lengths"],
                     lambda r: r["eval_bpc"], "evaluation length (characters, log scale)", "held-out bits per character",
                     True, footer)
    plot_text_panels(runs, out, "learning_curves.png", "Learning curves", lambda r: np.array(r["curve_x"]) / 1e6,
                     lambda r: r["curve_y"], "training characters seen (millions)",
                     "validation bits per character at length 64", False, footer, zoom_first=3)
    plot_probe(runs, out, footer)
    plot_biases(runs, out, "text", "biases_text.png", True, footer)
    plot_biases(runs, out, "probe", "biases_probe.png", False, footer)
    plot_losses(runs, out, footer)

    answer_lines = answer(runs, quick)
    body = [f"Command: `{command}`; runs ended {date}; {machine()}; report written at commit {commit()}; seeds {', '.join(map(str, seeds))} "
            "(each cell: mean [min, max] over seeds).", ""]
    if quick:
        body += ["**A quick run: a smoke test of the pipeline, far from converged. Its numbers answer nothing.**", ""]
    body += ["#### The answer of this run", ""] + [f"- {line}" for line in answer_lines] + [""]
    body += [f"- {line}" for line in setup_lines(runs)]
    body += ["", "#### Held-out bits per character, trained at length 64 on all training files", ""]
    body += text_table(runs, "text")
    body += ["", "#### The same, trained on every 20th record (small data)", ""]
    body += text_table(runs, "small")
    body += ["", "#### Probe: copy the symbol k back", ""]
    body += probe_table(runs)
    body += ["", "#### Convergence: what the last quarter of training still gained", "", "All training files:", ""]
    body += convergence_table(runs, "text", False)
    body += ["", "Small data:", ""]
    body += convergence_table(runs, "small", False)
    body += ["", "Probe:", ""]
    body += convergence_table(runs, "probe", True)
    check = budget_check(runs, out)
    if check:
        body += ["", "#### Budget check: the same training, four times longer", ""] + check
    check = budget_check(runs, out, "x16")
    if check:
        body += ["", "#### Convergence check: the same training, sixteen times longer", ""] + check
    body += ["", "#### The training step: cost against the machine's peak", ""]
    body += speed_lines(runs)
    body += ["", "![bits per character against evaluation length](results/quality/extrapolation.png)",
             "![learning curves](results/quality/learning_curves.png)",
             "![probe accuracy](results/quality/probe.png)",
             "![learned biases after the text runs](results/quality/biases_text.png)",
             "![learned biases after the probe runs](results/quality/biases_probe.png)",
             "![every run's training loss](results/quality/loss_curves.png)"]

    (out / "quality.md").write_text("# relbias quality benchmark\n\n" + "\n".join(body).replace("results/quality/", "") + "\n")
    (out / "summary.json").write_text(json.dumps({"command": command, "date": date, "machine": machine(), "commit": commit(),
                                                  "seeds": seeds, **summary(runs, answer_lines, quick)}, indent=1) + "\n")
    print(f"wrote {out / 'quality.md'}, {out / 'summary.json'} and the plots")

    readme = out.parent.parent / "README.md"
    if readme.exists():
        text = readme.read_text()
        start, stop = text.find(BEGIN), text.find(END)
        if 0 <= start < stop:
            readme.write_text(text[:start + len(BEGIN)] + "\n" + "\n".join(body) + "\n" + text[stop:])
            print(f"updated {readme}")


if __name__ == "__main__":
    main()
