#!/usr/bin/env python3
"""Turns the suite's Google Benchmark JSON into Markdown tables and PNG plots.

usage: report.py OUT_DIR forward.json [decode.json] [backward.json] [memory.txt]
Writes OUT_DIR/results.md, OUT_DIR/forward.png, OUT_DIR/decode.png, and the tables into
OUT_DIR/../README.md between its results markers, when it has them.
"""
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = re.compile(r"^(?P<pass>\w+)/(?P<policy>[\w/]+?)/(?P<args>\w+:.*?)(/min_time:[\d.]+)?/real_time$")


def load(path):
    """{(pass, policy, args...): benchmark} from one JSON file; args as a dict of ints. With
    repetitions, the fastest repetition (the least disturbed by other tenants of the machine)."""
    rows = {}
    for b in json.loads(Path(path).read_text())["benchmarks"]:
        m = NAME.match(b["name"])
        if not m or b.get("run_type") == "aggregate":
            continue
        args = dict(kv.split(":") for kv in m["args"].split("/"))
        key = (m["pass"], m["policy"], tuple(sorted((k, int(v)) for k, v in args.items())))
        if key not in rows or b["real_time"] < rows[key]["real_time"]:
            rows[key] = b
    return rows


def context_line(path):
    c = json.loads(Path(path).read_text())["context"]
    return (f"{c.get('host_name', '?')}: {c.get('num_cpus')} CPUs at {c.get('mhz_per_cpu')} MHz, "
            f"caches {', '.join(str(x['size'] // 1024) + ' KiB L' + str(x['level']) for x in c.get('caches', []))}; "
            f"{c.get('date', '')}")


def by_policy(rows, key_filter):
    table = defaultdict(dict)
    for (pas, policy, args), b in rows.items():
        a = dict(args)
        if key_filter(pas, a):
            table[policy][a.get("L", a.get("Lk"))] = b
    return table


def forward_tables(rows, out):
    lines = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, causal in zip(axes, (0, 1)):
        table = by_policy(rows, lambda p, a: p == "forward" and a.get("causal") == causal)
        lengths = sorted({length for t in table.values() for length in t})
        mode = "causal" if causal else "bidirectional"
        lines += [f"\n### Forward, {mode}: GFLOP/s, fastest repetition (ratio to fused `none` in the same run)\n",
                  "| policy | " + " | ".join(f"L={n}" for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        base = table.get("none", {})
        for policy in sorted(table, key=lambda p: (p != "none", p.startswith("reference"), p)):
            cells = []
            for n in lengths:
                b = table[policy].get(n)
                if b is None:
                    cells.append("-")
                    continue
                g = b["GFLOPS"] / 1e9 if b["GFLOPS"] > 1e6 else b["GFLOPS"]
                ratio = base[n]["real_time"] / b["real_time"] if n in base else float("nan")
                cells.append(f"{g:.1f} ({ratio:.2f}x)")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
            xs = sorted(table[policy])
            ax.plot(xs, [table[policy][x]["GFLOPS"] for x in xs], marker="o", label=policy,
                    linestyle="--" if policy.startswith("reference") else "-")
        ax.set_xscale("log", base=2)
        ax.set_title(f"forward, {mode}")
        ax.set_xlabel("sequence length L")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("GFLOP/s (fp32, 8 heads, d = 64)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forward.png", dpi=110)
    return lines


def causal_speedup(rows):
    """Tile skipping: the causal forward of `none` against the bidirectional one, per length."""
    modes = [by_policy(rows, lambda p, a, c=c: p == "forward" and a.get("causal") == c).get("none", {}) for c in (0, 1)]
    lengths = sorted(set(modes[0]) & set(modes[1]))
    return ["\n### Causal speedup over bidirectional (`none`, forward)\n",
            "| L | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|",
            "| bidirectional / causal time | " +
            " | ".join(f"{modes[0][n]['real_time'] / modes[1][n]['real_time']:.2f}x" for n in lengths) + " |"]


def decode_table(rows, out):
    table = by_policy(rows, lambda p, a: p == "decode")
    lengths = sorted({n for t in table.values() for n in t})
    lines = ["\n### Decode (Lq = 1): K and V streamed, GB/s (best of the repetitions)\n",
             "| policy | " + " | ".join(f"Lk={n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in sorted(table, key=lambda p: (p != "none", p)):
        lines.append(f"| {policy} | " + " | ".join(
            f"{table[policy][n]['GB/s'] / 1e9 if table[policy][n]['GB/s'] > 1e6 else table[policy][n]['GB/s']:.1f}"
            if n in table[policy] else "-" for n in lengths) + " |")
        ax.plot(lengths, [table[policy][n]["GB/s"] for n in lengths], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached keys Lk")
    ax.set_ylabel("GB/s")
    ax.set_title("decode step, 8 heads, d = 64")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=110)
    return lines


def backward_table(rows, forward_rows):
    lines = ["\n### Backward: time in ms, fastest repetition (ratio to the same policy's fused forward; ratio to backward `none`)\n",
             "| policy | mode | L | backward ms | / forward | / backward none |", "|---|---|---|---|---|---|"]
    for (pas, policy, args), b in sorted(rows.items(), key=lambda r: (r[0][2], r[0][1] != "none", r[0][1])):
        if pas != "backward":
            continue
        fwd = forward_rows.get(("forward", policy, args))
        none = rows.get(("backward", "none", args))
        a = dict(args)
        ms = b["real_time"]
        lines.append(f"| {policy} | {'causal' if a['causal'] else 'bidirectional'} | {a['L']} | {ms:.1f} | "
                     f"{ms / fwd['real_time']:.2f}x | " if fwd else f"| {policy} | {a['causal']} | {a['L']} | {ms:.1f} | - | ")
        lines[-1] += f"{ms / none['real_time']:.2f}x |" if none else "- |"
    return lines


def mqa_table(rows):
    """Multi-query backward at batch 1: one group, its query heads split over the threads."""
    runs = sorted((dict(args)["threads"], dict(args)["L"], b) for (pas, _, args), b in rows.items() if pas == "backward_mqa")
    if not runs:
        return []
    one = runs[0][2]["real_time"]
    return [f"\n### Backward, multi-query (8 query heads, 1 key/value head, batch 1, L = {runs[0][1]}, bidirectional)\n",
            "| threads | ms | speedup |", "|---|---|---|"] + [
        f"| {threads} | {b['real_time']:.1f} | {one / b['real_time']:.2f}x |" for threads, _, b in runs]


def median_table(path):
    """The acceptance checks at L = 4096 from repeated, interleaved runs: the median and the best
    repetition of each, and their ratios to none's."""
    medians, best = {}, {}
    for b in json.loads(Path(path).read_text())["benchmarks"]:
        m = NAME.match(b["run_name"])
        a = dict(kv.split(":") for kv in m["args"].split("/"))
        key = (m["pass"], m["policy"], int(a["causal"]))
        if b.get("aggregate_name") == "median":
            medians[key] = b
        elif b.get("run_type") == "iteration" and (key not in best or b["real_time"] < best[key]["real_time"]):
            best[key] = b
    count = max((b.get("repetitions", 0) for b in medians.values()), default=0)
    lines = [f"\n### L = 4096, bidirectional: {count} interleaved repetitions (the acceptance checks)\n",
             "| pass | policy | median ms | GFLOP/s | / none | best ms | GFLOP/s | / none |",
             "|---|---|---|---|---|---|---|---|"]
    for key, b in sorted(medians.items(), key=lambda r: (r[0][0] != "forward", r[0][2], r[0][1] != "none", r[0][1])):
        pas, policy, causal = key
        cells = []
        for table in (medians, best):
            row, none = table[key], table.get((pas, "none", causal))
            ratio = f"{row['real_time'] / none['real_time']:.2f}x" if none else "-"
            cells.append(f"{row['real_time']:.0f} | {row['GFLOPS']:.1f} | {ratio}")
        lines.append(f"| {pas} | {policy} | " + " | ".join(cells) + " |")
    return lines


BEGIN, END = "<!-- results: begin (bench/report.py writes this part) -->", "<!-- results: end -->"


def update_readme(readme, tables):
    """Replaces the part of readme between the markers with the tables of this run."""
    if not readme.exists():
        return
    text = readme.read_text()
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        return
    readme.write_text(text[:start + len(BEGIN)] + "\n" + tables + "\n" + text[stop:])
    print(f"updated {readme}")


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    forward = load(sys.argv[2])
    lines = ["# relbias benchmark results", "", f"Machine: {context_line(sys.argv[2])}"]
    lines += forward_tables(forward, out)
    lines += causal_speedup(forward)
    if len(sys.argv) > 3:
        lines += decode_table(load(sys.argv[3]), out)
    if len(sys.argv) > 4:
        lines += backward_table(load(sys.argv[4]), forward)
        lines += mqa_table(load(sys.argv[4]))
    targets = Path(sys.argv[2]).with_name("targets.json")
    if targets.exists():
        lines += median_table(targets)
    if len(sys.argv) > 5:
        lines += ["\n### Peak memory of the kernel beyond its tensors (causal)\n", "```",
                  Path(sys.argv[5]).read_text().strip(), "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")
    update_readme(out.parent / "README.md", "\n".join(lines[2:]))  # without the title line


if __name__ == "__main__":
    main()
