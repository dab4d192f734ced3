#!/usr/bin/env python3
"""Tables, plots and summary.json of the quality benchmark.

    python3 bench/quality/report.py OUT_DIR "COMMAND"

Reads OUT_DIR/runs/*.json (bench/quality/run.py), writes OUT_DIR/quality.md, OUT_DIR/*.png and
OUT_DIR/summary.json, and, when OUT_DIR/../../README.md has the quality markers (the committed
run: OUT_DIR = bench/results/quality), rewrites that part of it. Every number is the mean over
seeds with [min, max] beside it.
"""
import datetime
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SCHEMES = ["no_bias", "alibi", "kerple_power", "kerple_log", "t5", "per_offset", "fire"]
LEARNED = ["kerple_power", "kerple_log", "t5", "per_offset", "fire"]
COLORS = dict(zip(SCHEMES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
CLIP = -20  # bias axis floor in the bias plots
BEGIN, END = "<!-- quality: begin (bench/quality/report.py writes this part) -->", "<!-- quality: end -->"


def load_runs(out):
    runs = defaultdict(list)  # (name, scheme) -> runs sorted by seed
    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        runs[(path.name.split("_")[0], run["scheme"])].append(run)
    for key in runs:
        runs[key].sort(key=lambda r: r["seed"])
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
    import os
    return f"{platform.node()}: {model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def text_table(runs, name):
    some = next((runs[(name, s)] for s in SCHEMES if runs.get((name, s))), None)
    if not some:
        return []
    lengths = some[0]["eval_lengths"]
    first = some[0]
    lines = [f"| scheme | bias params | train CPU ms/step | " + " | ".join(f"bpc at {n} ({n // first['seq']}x)" for n in lengths) + " |",
             "|---" * (3 + len(lengths)) + "|"]
    for scheme in SCHEMES:
        group = runs.get((name, scheme), [])
        if not group:
            continue
        cells = [spread([r["eval_bpc"][k] for r in group]) for k in range(len(lengths))]
        lines.append(f"| {scheme} | {group[0]['bias_parameters']} | {spread([r['cpu_ms_per_step'] for r in group], 1)} | "
                     + " | ".join(cells) + " |")
    return lines


def curve_table(runs, name, label, digits):
    """The learning curve at four points: a quarter, half, three quarters and all of training."""
    some = next((runs[(name, s)] for s in SCHEMES if runs.get((name, s))), None)
    if not some:
        return []
    xs = some[0]["curve_x"]
    picks = sorted({len(xs) // 4, len(xs) // 2, 3 * len(xs) // 4, len(xs) - 1})
    lines = [f"| scheme | " + " | ".join(f"after {xs[k]:,.0f} {label}" for k in picks) + " |",
             "|---" * (1 + len(picks)) + "|"]
    for scheme in SCHEMES:
        group = runs.get((name, scheme), [])
        if group:
            lines.append(f"| {scheme} | " + " | ".join(spread([r["curve_y"][k] for r in group], digits) for k in picks) + " |")
    return lines


def band_plot(ax, runs, name, x_of, y_of, label_x, label_y):
    for scheme in SCHEMES:
        group = runs.get((name, scheme), [])
        if not group:
            continue
        x = np.array(x_of(group[0]), dtype=float)
        ys = np.array([y_of(r) for r in group], dtype=float)
        ax.plot(x, ys.mean(axis=0), marker="o", markersize=3, color=COLORS[scheme], label=scheme)
        if len(group) > 1:
            ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=COLORS[scheme], alpha=0.2)
    ax.set_xlabel(label_x)
    ax.set_ylabel(label_y)
    ax.grid(alpha=0.3)


def plot_text_panels(runs, out, file, title, x_of, y_of, label_x, label_y, log_x):
    """One panel for the runs on all training files, one for the small-data runs."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, name, data in zip(axes, ["text", "small"], ["all training files", "every 20th training record (5 %)"]):
        band_plot(ax, runs, name, x_of, y_of, label_x, label_y)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {data}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / file, dpi=110)
    plt.close(fig)


def plot_probe(runs, out):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    band_plot(ax, runs, "probe", lambda r: r["curve_x"], lambda r: r["curve_y"], "training sequences seen",
              "probe accuracy (fraction of positions)")
    ax.axhline(1 / 16, color="gray", linestyle=":", label="chance (1/16)")
    ax.set_ylim(0, 1)
    ax.set_title("Copy the symbol k = 5..9 back (length 32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)


def plot_biases(runs, out, name, file, log_x):
    alibi = runs.get((name, "alibi"))
    fig, axes = plt.subplots(1, len(LEARNED), figsize=(4 * len(LEARNED), 3.8))
    for ax, scheme in zip(axes, LEARNED):
        group = runs.get((name, scheme))
        if not group:
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
        # One scale for every panel. Below -20 a key's weight is under e^-20 = 2e-9 of the
        # row's, as good as masked, so the axis stops there (KERPLE power reaches -1e6 at 1024).
        hi = heads[:, shown].max()
        ax.set_ylim(max(heads[:, shown].min(), CLIP) - 0.5, max(hi, 1) + 0.5)
        ax.set_title(f"{scheme} (seed {run['seed']}, query at {run['bias_query_position']})", fontsize=9)
        ax.set_xlabel("distance i - j (positions" + (", log scale)" if log_x else ")"))
        ax.set_ylabel(f"bias added to the score (nats, clipped at {CLIP})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / file, dpi=110)
    plt.close(fig)


def plot_losses(runs, out):
    names = [n for n in ["text", "small", "probe"] if any(runs.get((n, s)) for s in SCHEMES)]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for scheme in SCHEMES:
            for run in runs.get((name, scheme), []):
                loss = np.array(run["train_loss"])
                window = max(1, len(loss) // 40)  # a running mean, so the seeds' lines stay readable
                smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(len(smooth)) + window, smooth, color=COLORS[scheme], linewidth=0.9,
                        linestyle="-" if run["seed"] == 0 else "--", label=f"{scheme} s{run['seed']}")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats per predicted token)")
        ax.set_title(f"Every run's training loss: {name}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def summary(runs):
    per_scheme = {}
    for scheme in SCHEMES:
        text, probe = runs.get(("text", scheme), []), runs.get(("probe", scheme), [])
        entry = {}
        if text:
            lengths = text[0]["eval_lengths"]
            entry["bias_parameters"] = text[0]["bias_parameters"]
            entry["train_ms_per_step"] = float(np.mean([r["cpu_ms_per_step"] for r in text]))  # CPU time, one thread
            entry["train_wall_ms_per_step"] = float(np.mean([r["ms_per_step"] for r in text]))
            entry["bpc_1x"] = float(np.mean([r["eval_bpc"][0] for r in text]))
            if 8 * text[0]["seq"] in lengths:
                k = lengths.index(8 * text[0]["seq"])
                entry["bpc_8x"] = float(np.mean([r["eval_bpc"][k] for r in text]))
        small = runs.get(("small", scheme), [])
        if small:
            entry["small_data_bpc_1x"] = float(np.mean([r["eval_bpc"][0] for r in small]))
        if probe:
            entry["probe_accuracy"] = float(np.mean([r["probe_accuracy"] for r in probe]))
        entry["seeds"] = len(text)
        per_scheme[scheme] = entry
    return per_scheme


def setup_lines(runs):
    text = next((runs[("text", s)][0] for s in SCHEMES if runs.get(("text", s))), None)
    small = next((runs[("small", s)][0] for s in SCHEMES if runs.get(("small", s))), None)
    probe = next((runs[("probe", s)][0] for s in SCHEMES if runs.get(("probe", s))), None)
    lines = []
    if text:
        lines.append(f"Model: {text['layers']} pre-LN blocks, d_model {text['d_model']}, {text['heads']} heads of "
                     f"{text['d_model'] // text['heads']}, MLP 4x (GELU), tied character embedding ({text['vocab']} symbols), "
                     f"{text['model_parameters']:,} weights, no absolute positions; one bias policy shared by both layers. "
                     f"Adam (lr {text['learning_rate']}, constant; the probe {probe['learning_rate'] if probe else '-'}), float, relbias's fused "
                     "forward and backward, one thread per run (two runs at a time). Train CPU ms/step: the process's CPU time per "
                     "step (forward, backward, Adam), which other tenants of a shared machine do not inflate.")
        lines.append(f"Text: Debian fortunes, {text['train_chars']:,} training characters; held out whole files "
                     f"{', '.join(text['held_out_files'])} ({text['held_out_chars']:,} characters), of which the first "
                     f"{text['final_eval_chars']:,} are scored at every length in non-overlapping windows (every character "
                     f"once, contexts 0 .. length - 1); learning curves score the first {text['curve_eval_chars']:,} at length {text['seq']}. "
                     f"Training: {text['steps']} steps of {text['batch']} random windows of {text['seq']} characters "
                     f"({text['steps'] * text['batch'] * text['seq']:,} characters), the same windows in the same order for every scheme of a seed.")
    if small:
        lines.append(f"Small data: every 20th training record ({small['train_chars']:,} characters), {small['steps']} steps "
                     f"({small['steps'] * small['batch'] * small['seq'] / small['train_chars']:.1f} passes over it).")
    if probe:
        lines.append(f"Probe: sequences of {probe['seq']} random symbols (16), each token also carrying k in 5..9 for its "
                     f"sequence; target at position t >= k is the symbol at t - k. {probe['steps']} steps of "
                     f"{probe['batch']} fresh sequences; accuracy on 512 fixed test sequences (chance 1/16).")
    return lines


def main():
    out = Path(sys.argv[1])
    command = sys.argv[2] if len(sys.argv) > 2 else "bash scripts/bench-quality.sh"
    runs = load_runs(out)
    if not runs:
        sys.exit(f"report.py: no runs in {out / 'runs'}")
    last_run = max(path.stat().st_mtime for path in (out / "runs").glob("*.json"))  # when the run ended
    date = datetime.datetime.fromtimestamp(last_run, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = sorted({r["seed"] for group in runs.values() for r in group})

    plot_text_panels(runs, out, "extrapolation.png", "Train at 64, test longer", lambda r: r["eval_lengths"],
                     lambda r: r["eval_bpc"], "evaluation length (characters, log scale)", "held-out bits per character",
                     log_x=True)
    plot_text_panels(runs, out, "learning_curves.png", "Learning curves", lambda r: np.array(r["curve_x"]) / 1e3,
                     lambda r: r["curve_y"], "training characters seen (thousands)",
                     "held-out bits per character at length 64", log_x=False)
    plot_probe(runs, out)
    plot_biases(runs, out, "text", "biases_text.png", log_x=True)
    plot_biases(runs, out, "probe", "biases_probe.png", log_x=False)
    plot_losses(runs, out)

    body = [f"Command: `{command}`; {date}; {machine()}; seeds {', '.join(map(str, seeds))} "
            "(each cell: mean [min, max] over seeds).", ""]
    body += setup_lines(runs)
    body += ["", "#### Held-out bits per character, trained at length 64 on all training files", ""]
    body += text_table(runs, "text")
    body += ["", "#### The same, trained on every 20th record (small data)", ""]
    body += text_table(runs, "small")
    body += ["", "#### Learning curves: held-out bits per character at length 64", ""]
    body += curve_table(runs, "text", "characters", 3)
    body += ["", "Small data:", ""]
    body += curve_table(runs, "small", "characters", 3)
    body += ["", "#### Probe: accuracy against training sequences seen", ""]
    body += curve_table(runs, "probe", "sequences", 3)
    body += ["", "![bits per character against evaluation length](results/quality/extrapolation.png)",
             "![learning curves](results/quality/learning_curves.png)",
             "![probe accuracy](results/quality/probe.png)",
             "![learned biases after the text runs](results/quality/biases_text.png)",
             "![learned biases after the probe runs](results/quality/biases_probe.png)",
             "![every run's training loss](results/quality/loss_curves.png)"]

    (out / "quality.md").write_text("# relbias quality benchmark\n\n" + "\n".join(body).replace("results/quality/", "") + "\n")
    (out / "summary.json").write_text(json.dumps({"command": command, "date": date, "machine": machine(),
                                                  "seeds": seeds, "schemes": summary(runs)}, indent=1) + "\n")
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
