#!/usr/bin/env python3
"""The main job's last word: per scheme, its cost beside its quality.

    python3 bench/summary.py OUT_DIR

Cost: forward and backward time ratio to no bias at the checks' length (medians from OUT_DIR/targets.json,
when the speed stage wrote it) and training CPU time per step of the quality model (one thread). Quality: held-out
bits per character at 1x and 8x the training length and probe accuracy (OUT_DIR/quality/summary.json),
then the quality run's answer (best scheme per question, ties within the seed spread).
"""
import json
import sys
from pathlib import Path

SCHEMES = ["no_bias", "alibi", "sandwich", "kerple_power", "kerple_log", "t5", "per_offset", "fire", "fire_train_L"]
SPEED_NAME = {"no_bias": "none", "fire_train_L": "fire"}  # "none": the baseline; FIRE costs the same at any threshold


def speed_ratios(targets):
    """{(pass, policy): median real time} from Google Benchmark's JSON, repetition medians only,
    and the sequence lengths they were measured at (4096 in a full run, shorter in a quick one)."""
    medians, lengths = {}, set()
    for bench in json.loads(targets.read_text())["benchmarks"]:
        if bench.get("aggregate_name") != "median" or "/reference/" in bench["name"]:
            continue
        pas, policy = bench["name"].split("/")[:2]
        medians[(pas, policy)] = bench["real_time"]
        lengths.update(part[2:] for part in bench["name"].split("/") if part.startswith("L:"))
    return medians, sorted(lengths, key=int)


def main():
    out = Path(sys.argv[1])
    quality_path = out / "quality" / "summary.json"
    targets = out / "targets.json"
    medians, lengths = speed_ratios(targets) if targets.exists() else ({}, [])
    quality = json.loads(quality_path.read_text()) if quality_path.exists() else None
    if not medians and not quality:
        sys.exit(f"summary.py: neither {targets} nor {quality_path} exists")

    def ratio(pas, scheme):
        base, mine = medians.get((pas, "none")), medians.get((pas, SPEED_NAME.get(scheme, scheme)))
        return f"{mine / base:.2f}x" if base and mine else "-"

    def value(entry, key, digits):
        return f"{entry[key]:.{digits}f}" if key in entry else "-"

    print("\nSummary: cost and quality of each scheme")
    if medians:
        print(f"  speed: median time at L = {', '.join(lengths) or '?'} (bidirectional) relative to no bias, from {targets}")
    if quality:
        print(f"  quality: {quality['command']} on {quality['date']}, mean over seeds {quality['seeds']}")
    header = f"{'scheme':13s} {'bias params':>11s} {'fwd time':>9s} {'bwd time':>9s} {'CPU ms/step':>13s} " \
             f"{'bpc 1x':>7s} {'bpc 8x':>7s} {'bpc 1x small':>12s} {'probe acc':>9s}"
    print(header)
    print("-" * len(header))
    schemes = quality["schemes"] if quality else {}
    for scheme in SCHEMES:
        q = schemes.get(scheme, {})
        params = str(q.get("bias_parameters", "-"))
        print(f"{scheme:13s} {params:>11s} {ratio('forward', scheme):>9s} {ratio('backward', scheme):>9s} "
              f"{value(q, 'train_ms_per_step', 1):>13s} {value(q, 'bpc_1x', 3):>7s} {value(q, 'bpc_8x', 3):>7s} "
              f"{value(q, 'small_data_bpc_1x', 3):>12s} {value(q, 'probe_accuracy', 3):>9s}")
    print("Lower bits per character is better; the probe's chance level is 0.0625.")
    if quality:
        if quality.get("quick"):
            print("\nA QUICK run: its quality numbers are a smoke test of the pipeline, not an answer.")
        print(f"\nThe answer of this run ({quality_path.parent / 'quality.md'} has the tables, ties and convergence):")
        for line in quality.get("answer", []):
            print(f"  - {line}")


if __name__ == "__main__":
    main()
