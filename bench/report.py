#!/usr/bin/env python3
"""Turns one run of the benchmark suite into Markdown tables and PNG plots.

usage: report.py OUT_DIR [--readme bench/README.md]

Reads from OUT_DIR what scripts/bench.sh wrote there: run.json (mode, date, machine, threads,
command), forward.json, decode.json, backward.json, targets.json (Google Benchmark JSON, every
repetition) and memory.txt. Writes OUT_DIR/results.md and the plots forward.png, bias_cost.png,
decode.png, backward.png, memory.png; with --readme, also the tables into that file between its
results markers (the full run does this, the quick run never does).

Statistics: a point is the median over its repetitions; throughput bars span the fastest to the
slowest repetition. A ratio to no bias compares every repetition of the policy with every
repetition of `none` (Google Benchmark interleaves them in random order, so no pairing is
better than another): the point is the ratio of the medians, the thick bar the interquartile
range of those pairwise ratios, the thin bar their full range. Ratios are of times: 1.10x means
10 % slower than no bias.
"""
import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

NAME = re.compile(r"^(?P<pass>\w+)/(?P<policy>[\w/]+?)/(?P<args>\w+:.*?)(/min_time:[\d.]+)?/real_time$")
FLOPS = "useful FLOPs: 4·Lq·Lk·d per head, half of that for causal (only the visible pairs)"
POLICY_ORDER = ["none", "alibi", "sandwich", "t5", "per_offset", "kerple_power", "kerple_log", "fire", "reference/none"]
MODES = {0: "bidirectional", 1: "causal"}
COLORS = dict(zip(POLICY_ORDER, plt.get_cmap("tab10").colors))


# --- loading ---------------------------------------------------------------------------------

def load(path):
    """{(pass, policy, args): [runs]} from Google Benchmark JSON, every repetition kept."""
    runs = defaultdict(list)
    if not path.exists():
        return runs
    for b in json.loads(path.read_text())["benchmarks"]:
        m = NAME.match(b.get("run_name", b["name"]))
        if not m or b.get("run_type") == "aggregate":
            continue
        args = tuple(sorted((k, int(v)) for k, v in (kv.split(":") for kv in m["args"].split("/"))))
        runs[(m["pass"], m["policy"], args)].append(b)
    return runs


def run_info(out):
    """The run's metadata (written by bench.sh), or what the benchmark JSON recorded."""
    path = out / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    context = json.loads((out / "forward.json").read_text())["context"]
    return {"mode": "unknown", "command": "unknown", "date": context.get("date", "unknown"),
            "cpu_model": "CPU model not recorded", "cores": context.get("num_cpus", "?"),
            "threads_per_core": None, "threads": "?", "commit": "unknown"}


def machine(info):
    smt = info.get("threads_per_core")
    smt = f"{smt} thread(s) per core" if isinstance(smt, int) else "threads per core not recorded"
    return f"{info['cpu_model']}, {info['cores']} cores, {smt}"


def short_description(info):
    """The caption under every table: mode, date, machine, threads, command."""
    return f"{info['mode']} run, {info['date']}, {machine(info)}, {info['threads']} threads, `{info['command']}`"


def describe(info):
    """One line naming the mode, date, machine, threads and command of the run."""
    line = (f"{info['mode']} run, {info['date']}; {machine(info)}; {info['threads']} threads; "
            f"`{info['command']}` at {info['commit']}")
    return line + (f" ({info['note']})" if info.get("note") else "")


# --- statistics ------------------------------------------------------------------------------

def value(run, counter):
    """A counter in its natural unit (Google Benchmark stores rates per second)."""
    v = run[counter]
    return v / 1e9 if v > 1e6 else v


def median(runs, counter="real_time"):
    return statistics.median(value(r, counter) if counter != "real_time" else r["real_time"] for r in runs)


def spread(runs, counter):
    values = [value(r, counter) for r in runs]
    return min(values), max(values)


def time_ratio(runs, base):
    """Time of runs relative to base: (ratio of medians, (q1, q3), (min, max)) of pairwise ratios."""
    pairs = [r["real_time"] / b["real_time"] for r in runs for b in base]
    q1, q3 = np.percentile(pairs, [25, 75])
    return median(runs) / median(base), (q1, q3), (min(pairs), max(pairs))


def repetitions(rows):
    """'3 repetitions', '1 repetition' or '3-5 repetitions' for a set of benchmarks."""
    counts = sorted({len(v) for v in rows.values()}) or [0]
    text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{text} repetition" + ("" if counts == [1] else "s")


def policies(names):
    return sorted(names, key=lambda p: POLICY_ORDER.index(p) if p in POLICY_ORDER else len(POLICY_ORDER))


def select(rows, pas, **fixed):
    """{policy: {free argument value: runs}} of one pass, with the given arguments fixed;
    {policy: runs} when they fix every argument."""
    table = defaultdict(dict)
    for (p, policy, args), runs in rows.items():
        a = dict(args)
        if p == pas and all(a.get(k) == v for k, v in fixed.items()):
            free = [v for k, v in args if k not in fixed]
            if free:
                table[policy][free[0] if len(free) == 1 else tuple(free)] = runs
            else:
                table[policy] = runs
    return table


# --- plotting --------------------------------------------------------------------------------

def finish(fig, out, name, info, title):
    for ax in fig.axes:  # every axis from zero, tall enough for the largest bar unless clipped
        top = getattr(ax, "clip_top", None)
        ax.set_ylim(0, top if top else max(ax.dataLim.y1, ax.get_ylim()[1]) * 1.05)
        if top and ax.dataLim.y1 > top:
            ax.text(0.99, 0.98, f"bars cut at {top:.1f}: a noisy repetition reached {ax.dataLim.y1:.1f}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3")
    fig.suptitle(f"{title}\n{info['mode']} run, {info['date']}, {info['threads']} threads", fontsize=10)
    fig.text(0.01, 0.005, f"{machine(info)}; {info['command']} at {info['commit']}", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(out / name, dpi=100)
    plt.close(fig)


def throughput_lines(ax, table, counter, xlabel):
    """Median throughput per policy over the swept argument, bars from slowest to fastest."""
    points = []
    for policy in policies(table):
        xs = sorted(table[policy])
        mid = [median(table[policy][x], counter) for x in xs]
        points += mid
        lo, hi = zip(*(spread(table[policy][x], counter) for x in xs))
        ax.errorbar(xs, mid, yerr=[np.subtract(mid, lo), np.subtract(hi, mid)], marker="o", ms=3, capsize=2,
                    label=policy, color=COLORS.get(policy), linestyle="--" if policy.startswith("reference") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    clip_axis(ax, points, 0.0)


def ratio_lines(ax, table, xlabel):
    """Time relative to `none` per policy over the swept argument, IQR and range of the pairs."""
    base = table.get("none", {})
    points = []
    for n, policy in enumerate(p for p in policies(table) if p not in ("none", "reference/none")):
        xs = [x for x in sorted(table[policy]) if x in base]
        stats = [time_ratio(table[policy][x], base[x]) for x in xs]
        shifted = [x * 2 ** ((n - 3) * 0.04) for x in xs]  # side by side, not on top of each other
        mid = [s[0] for s in stats]
        points += mid
        line = ax.errorbar(shifted, mid, yerr=[[m - s[2][0] for m, s in zip(mid, stats)],
                                               [s[2][1] - m for m, s in zip(mid, stats)]],
                           marker="o", ms=3, capsize=2, lw=1, label=policy, color=COLORS.get(policy))
        ax.errorbar(shifted, mid, yerr=[[m - s[1][0] for m, s in zip(mid, stats)], [s[1][1] - m for m, s in zip(mid, stats)]],
                    fmt="none", lw=4, alpha=0.5, color=line[0].get_color())
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    clip_axis(ax, points, 2.0)


def clip_axis(ax, points, least):
    """The axis ends a little above the largest median (and at least at `least`): one disturbed
    repetition can stretch a range bar tenfold and flatten every point; finish() says so."""
    top = max([least] + [1.3 * p for p in points])
    for other in [ax] + list(ax.get_shared_y_axes().get_siblings(ax)):
        other.clip_top = max(getattr(other, "clip_top", 0), top)


def grouped_bars(ax, groups, series, get):
    """Bars of get(group, series) -> (mid, lo, hi) or None, one cluster per group."""
    width = 0.8 / max(len(series), 1)
    for n, name in enumerate(series):
        cells = [get(g, name) for g in groups]
        xs = [i + (n - (len(series) - 1) / 2) * width for i, c in enumerate(cells) if c]
        mids = [c[0] for c in cells if c]
        ax.bar(xs, mids, width, label=name, color=COLORS.get(name),
               yerr=[[c[0] - c[1] for c in cells if c], [c[2] - c[0] for c in cells if c]], capsize=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


# --- tables ----------------------------------------------------------------------------------

def table_lines(title, header, rows):
    return [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def forward_section(rows, out, info):
    lines = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    cost, cost_axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for causal, ax, cost_ax in zip((0, 1), axes, cost_axes):
        table = select(rows, "forward", causal=causal)
        lengths = sorted({n for t in table.values() for n in t})
        base = table.get("none", {})
        body = []
        for policy in policies(table):
            cells = []
            for n in lengths:
                runs = table[policy].get(n)
                ratio = f" ({time_ratio(runs, base[n])[0]:.2f}x)" if runs and n in base else ""
                cells.append(f"{median(runs, 'GFLOPS'):.1f}{ratio}" if runs else "-")
            body.append([policy] + cells)
        lines += table_lines(f"Forward, {MODES[causal]}: GFLOP/s, median of {repetitions(table_runs(table))} "
                             f"(time / time of `none`)", ["policy"] + [f"L={n}" for n in lengths], body)
        throughput_lines(ax, table, "GFLOPS", "sequence length L (= Lq = Lk)")
        ax.set_title(f"forward, {MODES[causal]}", fontsize=9)
        ratio_lines(cost_ax, table, "sequence length L (= Lq = Lk)")
        cost_ax.set_title(f"forward, {MODES[causal]}", fontsize=9)
    axes[0].set_ylabel("GFLOP/s (fp32, 8 heads, d = 64, batch 1)")
    axes[0].text(0.01, 0.01, FLOPS, transform=axes[0].transAxes, fontsize=7)
    axes[1].legend(fontsize=7, loc="lower right")
    finish(fig, out, "forward.png", info, f"Forward throughput: median, bars from slowest to fastest repetition "
           f"({repetitions(rows)} per point)")
    cost_axes[0].set_ylabel("time / time of no bias (1 = no cost)")
    cost_axes[1].legend(fontsize=7, loc="lower right")
    finish(cost, out, "bias_cost.png", info, f"Cost of each bias in the forward ({repetitions(rows)} per "
           "point): ratio of median times to no bias;\nthick bar: IQR, thin: range of the ratios of all repetition pairs")
    return lines


def table_runs(table):
    return {(p, x): runs for p, t in table.items() for x, runs in t.items()}


def causal_speedup(rows):
    modes = [select(rows, "forward", causal=c).get("none", {}) for c in (0, 1)]
    lengths = sorted(set(modes[0]) & set(modes[1]))
    return table_lines("Causal speedup over bidirectional (`none`, forward): ratio of median times",
                       ["L"] + [str(n) for n in lengths],
                       [["bidirectional / causal time"] + [f"{median(modes[0][n]) / median(modes[1][n]):.2f}x" for n in lengths]])


def decode_section(rows, out, info):
    table = select(rows, "decode")
    lengths = sorted({n for t in table.values() for n in t})
    base = table.get("none", {})
    body = [[policy] + [f"{median(table[policy][n], 'GB/s'):.1f} ({time_ratio(table[policy][n], base[n])[0]:.2f}x)"
                        if n in table[policy] and n in base else "-" for n in lengths] for policy in policies(table)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    throughput_lines(axes[0], table, "GB/s", "cached keys Lk")
    axes[0].set_ylabel("K and V bytes streamed per second (GB/s)")
    axes[0].legend(fontsize=7, loc="lower right")
    ratio_lines(axes[1], table, "cached keys Lk")
    axes[1].set_ylabel("time / time of no bias")
    finish(fig, out, "decode.png", info, f"One decoding step (Lq = 1, causal, 8 heads, d = 64): median of "
           f"{repetitions(rows)}; left bars: range, right: IQR (thick) and range of pairs")
    return table_lines(f"Decode (Lq = 1): K and V streamed, GB/s, median of {repetitions(rows)} "
                       "(time / time of `none`)", ["policy"] + [f"Lk={n}" for n in lengths], body)


def storage_measures(rows, length=32768):
    """({storage: runs} of the decode step over fp32, f16 and bf16 caches at Lk = length, {probe: median GB/s})."""
    probes = {name: median(next(iter(runs.values())), "GB/s") for name, runs in select(rows, "probe").items()}
    return select(rows, "storage", Lk=length), probes


def storage_section(rows):
    """Tokens/s and bytes/s of each cache format, beside the memory bandwidth probes of the same run."""
    table, probes = storage_measures(rows)
    if "fp32" not in table:
        return []
    base = median(table["fp32"], "tokens/s")
    body = [[name, f"{median(runs, 'tokens/s'):.1f}", f"{median(runs, 'tokens/s') / base:.2f}x", f"{median(runs, 'GB/s'):.1f}"] +
            [f"{median(runs, 'GB/s') / probes[p]:.2f}" if p in probes else "-" for p in ("copy", "read")]
            for name, runs in ((n, table[n]) for n in ("fp32", "f16", "bf16") if n in table)]
    probe_text = ", ".join(f"{p} {gbs:.1f} GB/s" for p, gbs in sorted(probes.items()))
    return table_lines(f"Decode (Lq = 1, Lk = 32768, no bias) by cache format, median of {repetitions(rows)}; "
                       f"bandwidth probes: {probe_text or 'not measured'}",
                       ["cache", "tokens/s", "over fp32", "GB/s (K and V)", "of copy GB/s", "of read GB/s"], body)


def storage_targets(rows, row):
    """The 16-bit cache targets: >= 1.8x the fp32 cache's tokens/s and >= 70 % of the copy bandwidth."""
    table, probes = storage_measures(rows)
    halves = [n for n in ("f16", "bf16") if n in table]
    if "fp32" not in table or not halves or "copy" not in probes:
        row("decode, Lk = 32768: a 16-bit cache >= 1.8x the fp32 cache's tokens/s, >= 70 % of copy GB/s",
            "not measured in this run", None)
        return
    base = median(table["fp32"], "tokens/s")
    speed = {n: median(table[n], "tokens/s") / base for n in halves}
    share = {n: median(table[n], "GB/s") / probes["copy"] for n in halves}
    row("decode, Lk = 32768: f16 or bf16 cache >= 1.8x the tokens/s of the fp32 cache",
        ", ".join(f"{n} {r:.2f}x" for n, r in speed.items()), max(speed.values()) >= 1.8)
    row("... and >= 70 % of the copy bandwidth (bytes of K and V per second)",
        ", ".join(f"{n} {r:.2f}" for n, r in share.items()), max(share.values()) >= 0.7)


def backward_section(rows, forward_rows, out, info):
    shapes = sorted({(dict(a)["L"], dict(a)["causal"]) for (p, _, a) in rows if p == "backward"})
    body = []
    for length, causal in shapes:
        table = select(rows, "backward", L=length, causal=causal)
        base = table.get("none")
        for policy in policies(table):
            runs, key = table[policy], ("forward", policy, (("L", length), ("causal", causal)))
            fwd = forward_rows.get(key)
            body.append([policy, MODES[causal], length, f"{median(runs):.1f}", f"{median(runs) / median(fwd):.2f}x" if fwd else "-",
                         f"{time_ratio(runs, base)[0]:.2f}x" if base else "-"])
    lines = table_lines(f"Backward with the bias gradient: median ms of {repetitions(select_pass(rows, 'backward'))} "
                        "(/ the same policy's forward; / backward of `none`)",
                        ["policy", "mode", "L", "backward ms", "/ forward", "/ backward none"], body)
    groups = [f"L={n} {MODES[c]}" for n, c in shapes]
    names = policies({p for (pas, p, _) in rows if pas == "backward"})

    def throughput(group, policy):
        runs = select(rows, "backward", L=shapes[groups.index(group)][0], causal=shapes[groups.index(group)][1]).get(policy)
        return (median(runs, "GFLOPS"), *spread(runs, "GFLOPS")) if runs else None

    def cost(group, policy):
        table = select(rows, "backward", L=shapes[groups.index(group)][0], causal=shapes[groups.index(group)][1])
        if policy not in table or "none" not in table:
            return None
        mid, _, (lo, hi) = time_ratio(table[policy], table["none"])
        return mid, lo, hi

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    grouped_bars(axes[0], groups, names, throughput)
    axes[0].set_ylabel("GFLOP/s (2.5x the forward's useful FLOPs)")
    axes[0].set_title("throughput: median, bars: range of repetitions", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    grouped_bars(axes[1], groups, [n for n in names if n != "none"], cost)
    axes[1].axhline(1.0, color="0.3", lw=0.8)
    axes[1].set_ylabel("time / time of no bias")
    axes[1].set_title("cost of the bias: ratio of medians, bars: range of repetition pairs", fontsize=9)
    finish(fig, out, "backward.png", info, f"Backward with the bias-parameter gradient (fp32, 8 heads, d = 64), "
           f"{repetitions(select_pass(rows, 'backward'))} per bar")
    return lines + mqa_table(rows)


def select_pass(rows, pas):
    return {k: v for k, v in rows.items() if k[0] == pas}


def mqa_table(rows):
    runs = sorted((dict(a)["threads"], dict(a)["L"], r) for (p, _, a), r in rows.items() if p == "backward_mqa")
    if not runs:
        return []
    one = median(runs[0][2])
    return table_lines(f"Backward, multi-query (8 query heads, 1 key/value head, batch 1, L = {runs[0][1]}, bidirectional), "
                       "median ms", ["threads", "ms", "speedup"],
                       [[t, f"{median(r):.1f}", f"{one / median(r):.2f}x"] for t, _, r in runs])


def checks_section(rows, out, info):
    """The acceptance checks: one length, bidirectional, many interleaved repetitions."""
    if not rows:
        return [], None
    length = next(dict(a)["L"] for (_, _, a) in rows)
    body = []
    for pas in ("forward", "backward"):
        table = select(rows, pas, L=length, causal=0)
        for policy in policies(table):
            runs, base = table[policy], table.get("none")
            best = min(r["real_time"] for r in runs)
            body.append([pas, policy, f"{median(runs):.0f}", f"{median(runs, 'GFLOPS'):.1f}",
                         f"{time_ratio(runs, base)[0]:.2f}x" if base else "-", f"{best:.0f}",
                         f"{best / min(r['real_time'] for r in base):.2f}x" if base else "-"])
    count = repetitions(rows)
    lines = table_lines(f"Acceptance checks, L = {length}, bidirectional: {count}, interleaved",
                        ["pass", "policy", "median ms", "median GFLOP/s", "/ none (medians)", "best ms", "/ none (bests)"], body)

    def cost(pas, policy):
        table = select(rows, pas, L=length, causal=0)
        if policy not in table or "none" not in table:
            return None
        mid, (q1, q3), (lo, hi) = time_ratio(table[policy], table["none"])
        return mid, q1, q3, lo, hi

    fig, ax = plt.subplots(figsize=(10, 4.8))
    names = [p for p in policies({p for (_, p, _) in rows}) if p not in ("none", "reference/none")]
    for n, pas in enumerate(("forward", "backward")):
        cells = [(i, cost(pas, p)) for i, p in enumerate(names)]
        cells = [(i + (n - 0.5) * 0.38, c) for i, c in cells if c]
        xs, mids = [x for x, _ in cells], [c[0] for _, c in cells]
        ax.bar(xs, mids, 0.38, label=pas, alpha=0.6)
        ax.errorbar(xs, mids, yerr=[[m - c[1] for m, (_, c) in zip(mids, cells)], [c[2] - m for m, (_, c) in zip(mids, cells)]],
                    fmt="none", lw=5, color="0.2", alpha=0.5)
        ax.errorbar(xs, mids, yerr=[[m - c[3] for m, (_, c) in zip(mids, cells)], [c[4] - m for m, (_, c) in zip(mids, cells)]],
                    fmt="none", lw=1, capsize=3, color="0.2")
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("time / time of no bias (1 = no cost)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    finish(fig, out, "checks.png", info, f"Cost of each bias at L = {length}, bidirectional, {count}, interleaved:\n"
           "ratio of medians; thick bar: IQR, thin: range of all repetition pairs")
    return lines, length


def memory_section(path, out, info):
    if not path.exists():
        return [], {}
    entries = [dict(kv.split("=") for kv in line.split()) for line in path.read_text().split("\n") if line.strip()]
    peaks = {(e["policy"], e["pass"]): float(e["kernel_peak_MiB"]) for e in entries}
    length = entries[0]["L"]
    names = policies({e["policy"] for e in entries})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    grouped_bars(ax, names, ["forward", "backward"],
                 lambda p, pas: (peaks[(p, pas)],) * 3 if (p, pas) in peaks else None)
    ax.set_ylabel("MiB the kernel allocates beyond its tensors")
    ax.legend(fontsize=8)
    finish(fig, out, "memory.png", info, f"Peak memory of one causal call, L = {length} (one measurement each)")
    body = [[p] + [f"{peaks[(p, pas)]:.2f}" if (p, pas) in peaks else "-" for pas in ("forward", "backward")] +
            [next(e["tensors_MiB"] for e in entries if e["policy"] == p)] for p in names]
    return table_lines(f"Peak memory of one causal call beyond its tensors, L = {length}, MiB",
                       ["policy", "forward", "backward", "tensors (q, k, v, o, ... )"], body), {"L": int(length), **{
                           f"{pas}_max": max(v for (p, s), v in peaks.items() if s == pas) for pas in ("forward", "backward")}}


def targets_section(forward, decode, checks, check_length, memory, mode):
    """The project's performance targets, each with the value this run measured and the verdict."""
    rows = []

    def row(target, measured, met):
        rows.append([target, measured, "-" if met is None else ("met" if met else "**not met**")])

    if check_length == 4096:
        f = select(checks, "forward", L=4096, causal=0)
        b = select(checks, "backward", L=4096, causal=0)
        none = f["none"]
        row("forward, no bias, L = 4096: >= 140 GFLOP/s", f"{median(none, 'GFLOPS'):.1f} GFLOP/s (median)",
            median(none, "GFLOPS") >= 140)
        if "reference/none" in f:
            r = time_ratio(f["reference/none"], none)[0]
            row("... and >= 1.3x faster than the materialising reference", f"{r:.2f}x", r >= 1.3)
        shift = [p for p in ("alibi", "t5", "per_offset", "kerple_power", "kerple_log") if p in f]
        worst = max(time_ratio(f[p], none)[0] for p in shift)
        row("shift-invariant policies within 10 % of no bias (forward)",
            ", ".join(f"{p} {time_ratio(f[p], none)[0]:.2f}x" for p in shift), worst <= 1.10)
        if "fire" in f:
            r = time_ratio(f["fire"], none)[0]
            row("FIRE within 2x of no bias (forward)", f"{r:.2f}x", r <= 2)
        if "none" in b:
            r = median(b["none"]) / median(none)
            row("backward, no bias, within 3x of the forward", f"{r:.2f}x (medians)", r <= 3)
            learned = [p for p in ("t5", "per_offset", "kerple_power", "kerple_log") if p in b]
            worst = max(time_ratio(b[p], b["none"])[0] for p in learned)
            row("learned shift-invariant backward within 15 % of no bias",
                ", ".join(f"{p} {time_ratio(b[p], b['none'])[0]:.2f}x" for p in learned), worst <= 1.15)
            if "fire" in b:
                r = time_ratio(b["fire"], b["none"])[0]
                row("FIRE backward within 2.5x of no bias", f"{r:.2f}x", r <= 2.5)
    else:
        row("the targets at L = 4096", f"not measured: this run's checks are at L = {check_length}", None)
    none = select(forward, "forward", L=8192)
    if "none" in none and 0 in none["none"] and 1 in none["none"]:
        r = median(none["none"][0]) / median(none["none"][1])
        row("causal >= 1.8x faster than bidirectional, L = 8192", f"{r:.2f}x (medians)", r >= 1.8)
    else:
        row("causal >= 1.8x faster than bidirectional, L = 8192", "not measured in this run", None)
    steps = select(decode, "decode")
    if steps and all(32768 in t for t in steps.values()):
        slowest = min(steps, key=lambda p: median(steps[p][32768], "GB/s"))
        gbs = median(steps[slowest][32768], "GB/s")
        row("decode, Lk = 32768: K and V at >= 16 GB/s", f"slowest: {slowest} {gbs:.1f} GB/s (median)", gbs >= 16)
    else:
        row("decode, Lk = 32768: K and V at >= 16 GB/s", "not measured in this run", None)
    storage_targets(decode, row)
    for pas in ("forward", "backward"):
        if memory.get("L") == 32768:
            peak = memory[f"{pas}_max"]
            row(f"{pas} kernel memory at L = 32768 < 64 MiB", f"at most {peak:.1f} MiB", peak < 64)
        else:
            row(f"{pas} kernel memory at L = 32768 < 64 MiB", f"not measured: L = {memory.get('L')} in this run", None)
    caveat = "" if mode == "full" else f"; a {mode} run, so few repetitions: indicative only"
    return table_lines(f"Against the targets (read off the tables below{caveat})", ["target", "measured", ""], rows)


def peak_section(checks, out):
    """The kernels at L = 4096 as fractions of the FMA peak that bench/peak.hpp measured when the
    same benchmark program started (targets.json keeps the forward program's context)."""
    path = out / "targets.json"
    if not checks or not path.exists():
        return []
    context = json.loads(path.read_text())["context"]
    one = float(context.get("fma_peak_gflops_1_thread", "nan"))
    every = {int(k.split("_")[3]): float(v) for k, v in context.items()
             if k.startswith("fma_peak_gflops_") and k.endswith("_threads")}
    threads, peak_all = max(every.items()) if every else (1, one)
    length = next(dict(a)["L"] for (_, _, a) in checks)
    body = []
    for pas, used in (("forward", threads), ("forward_one_thread", 1), ("backward", threads), ("backward_one_thread", 1)):
        table = select(checks, pas, L=length, causal=0)
        peak = one if used == 1 else peak_all
        for policy in [p for p in ("none", "alibi", "t5", "fire") if p in table]:
            gflops = median(table[policy], "GFLOPS")
            body.append([pas, policy, used, f"{gflops:.1f}", f"{gflops / peak:.2f}", f"{gflops / (used * one):.2f}"])
    note = (f"FMA peak, fp32, measured as the benchmark program started: one thread {one:.0f} GFLOP/s, "
            f"{threads} threads {peak_all:.0f} GFLOP/s; {context.get('topology', 'topology not recorded')}")
    lines = table_lines(f"Fraction of the machine's peak, L = {length}, bidirectional ({note})",
                        ["pass", "policy", "threads", "median GFLOP/s", "/ peak of those threads", "/ (threads x one-thread peak)"],
                        body)
    for pas, target in (("forward_one_thread", 0.65), ("backward_one_thread", 0.5)):
        none = select(checks, pas, L=length, causal=0).get("none")
        if none:
            fraction = median(none, "GFLOPS") / one
            lines.append(f"\nTarget: {pas.split('_')[0]}, no bias, one thread >= {target} of the one-thread FMA peak: "
                         f"{fraction:.2f}, {'met' if fraction >= target else '**not met**'}.")
    return lines


BEGIN, END = "<!-- results: begin (bench/report.py writes this part) -->", "<!-- results: end -->"


def update_readme(readme, tables):
    """Replaces the part of readme between the markers with this run's tables."""
    text = readme.read_text()
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{readme} has no results markers")
    readme.write_text(text[:start + len(BEGIN)] + "\n" + tables + "\n" + text[stop:])
    print(f"   updated {readme}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the run's directory (bench/results or build-bench/quick)")
    parser.add_argument("--readme", type=Path, help="also write the tables into this file between its markers")
    args = parser.parse_args()
    out, info = args.out, run_info(args.out)
    forward, decode, backward = (load(out / f"{name}.json") for name in ("forward", "decode", "backward"))
    checks = load(out / "targets.json")

    lines = [f"Run: {describe(info)}. Compiler: {info.get('compiler', 'not recorded')}, "
             f"{info.get('flags', 'flags not recorded')}.",
             f"Every table below comes from this {info['mode']} run; fp32, 8 heads, d = 64, batch 1. "
             "Ratios are of times (1.10x = 10 % slower than `none`)."]
    check_lines, check_length = checks_section(checks, out, info)
    memory_lines, memory = memory_section(out / "memory.txt", out, info)
    lines += targets_section(forward, decode, checks, check_length, memory, info["mode"])
    lines += check_lines
    lines += peak_section(checks, out)
    lines += forward_section(forward, out, info) + causal_speedup(forward)
    if decode:
        lines += decode_section(decode, out, info) + storage_section(decode)
    if backward:
        lines += backward_section(backward, forward, out, info)
    lines += memory_lines
    caption = f"_{short_description(info)}_"
    lines = [line + f"\n{caption}\n" if line.startswith("\n### ") else line for line in lines]
    (out / "results.md").write_text("# relbias benchmark results\n\n" + "\n".join(lines) + "\n")
    print(f"   wrote {out / 'results.md'} and the plots beside it")
    if args.readme:
        update_readme(args.readme, "\n".join(lines))


if __name__ == "__main__":
    main()
