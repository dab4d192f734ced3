#!/usr/bin/python3
"""Forward + backward of relbias.attention against PyTorch's eager attention with the bias
materialised, for every bias module: time and peak memory, same machine, same run.

    PYTHONPATH=build-release/python /usr/bin/python3 python/bench/bench_attention.py            # L = 1024..8192
    PYTHONPATH=build-release/python /usr/bin/python3 python/bench/bench_attention.py --lengths 1024 2048 4096

Setup: batch 1, 8 heads, head dim 64, float32, causal (a decoder's self-attention); the loss is
sum(O * G) for a fixed random G, so the backward computes dq, dk, dv and the bias parameters'
gradients in both implementations. Eager: scores = scale Q K^T + bias.materialize(L, L), the
causal mask, softmax, P V, and autograd's backward: PyTorch 1.13 has no fused CPU attention
with a bias gradient. Both run on the same torch.get_num_threads() threads (--threads).

Each (implementation, L, bias) runs in a fresh process, so its memory is its own: after a warm-up
call the peak resident set is reset (Linux's /proc/self/clear_refs), and the peak during one
forward + backward (VmHWM) minus the resident set before it is the extra memory the call needs
(inputs, output gradient and weights excluded; outputs, saved tensors and gradients included). Time: the median of --reps
calls after the warm-up. The table gives both per L and bias, with their ratios.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

BIASES = ["none", "alibi", "t5", "per_offset", "kerple_power", "kerple_log", "fire", "sandwich"]


def make_bias(name, heads, dim):
    import relbias

    if name == "alibi":
        return relbias.ALiBi(heads)
    if name == "t5":
        bias = relbias.T5Bias(heads, causal=True)
        bias.reset_parameters(0, 512)
        return bias
    if name == "per_offset":
        bias = relbias.PerOffset(heads, causal=True, clip=128)
        bias.reset_parameters(0, 0.02)
        return bias
    if name == "kerple_power":
        return relbias.KerplePower(heads)
    if name == "kerple_log":
        return relbias.KerpleLog(heads)
    if name == "fire":
        return relbias.FIRE(heads)
    if name == "sandwich":
        return relbias.Sandwich(heads, dim)
    return relbias.NoBias(heads)


def eager_attention(q, k, v, bias, causal=True):
    """softmax(scale Q K^T + B + mask) V, materialised: q, k, v [B, L, H, D]."""
    import torch

    L, D = q.shape[1], q.shape[3]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    s = qt @ kt.transpose(-1, -2) / math.sqrt(D) + bias.materialize(L, L)
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ vt).transpose(1, 2)


def run_one(impl, length, bias_name, reps, threads):
    """One configuration in this process: {"ms": median time, "mib": extra peak memory}."""
    import torch

    import relbias

    torch.set_num_threads(threads)
    heads, dim = 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, heads, dim, generator=g).requires_grad_() for _ in range(3))
    grad_out = torch.randn(1, length, heads, dim, generator=g)
    bias = make_bias(bias_name, heads, dim)

    def step():
        o = relbias.attention(q, k, v, bias, causal=True) if impl == "relbias" else eager_attention(q, k, v, bias)
        o.backward(grad_out)
        for t in [q, k, v, *bias.parameters()]:
            t.grad = None

    step()  # warm-up: thread pools, first-touch pages of the allocator's arenas
    before = reset_peak_rss()
    step()
    extra = peak_rss() - before
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "mib": extra / 2**20}


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def reset_peak_rss():
    """Resets the peak resident set (VmHWM; Linux >= 4.0) and returns the current one (VmRSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def peak_rss():
    return status_bytes("VmHWM")


def flops(length, heads=8, dim=64):
    """Forward + backward FLOPs of causal attention: 4 L^2 D H / 2 forward, 2.5x that backward."""
    return 3.5 * 4 * length * length / 2 * dim * heads


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} vCPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def blas_name():
    try:
        return os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3").split("/")[-2]
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--biases", nargs="+", default=BIASES, choices=BIASES)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--eager-max-length", type=int, default=4096,
                        help="longer L run relbias only (eager needs several [8, L, L] float tensors: ~10 GiB at 8192)")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "L", "BIAS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, length, bias = args.one
        print(json.dumps(run_one(impl, int(length), bias, args.reps, args.threads)))
        return

    import torch

    command = "/usr/bin/python3 python/bench/bench_attention.py " + " ".join(sys.argv[1:])
    print(f"Command: `{command.strip()}`  ")
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_name()}; "
          f"{args.threads} threads; PyTorch {torch.__version__} (BLAS: {blas_name()})  ")
    print("Batch 1, 8 heads, head dim 64, float32, causal; forward + backward (dq, dk, dv and the bias "
          f"parameters); median of {args.reps} after a warm-up; GFLOP/s: the causal products' FLOPs (3.5 x 2 L^2 D H, "
          "the same count for both) per second; memory: the call's extra peak RSS.\n")
    print("| L | bias | relbias ms | GFLOP/s | eager ms | GFLOP/s | speed-up | relbias MiB | eager MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for bias in args.biases:
            results = {}
            for impl in ("relbias", "eager"):
                if impl == "eager" and length > args.eager_max_length:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", impl, str(length), bias, "--reps", str(args.reps),
                                      "--threads", str(args.threads)], capture_output=True, text=True)
                if out.returncode != 0:
                    results[impl] = None
                    print(f"<!-- {impl} L={length} {bias} failed: {out.stderr.strip().splitlines()[-1:]} -->")
                else:
                    results[impl] = json.loads(out.stdout)
            r, e = results.get("relbias"), results.get("eager")
            gf = lambda x: f"{flops(length) / x['ms'] / 1e6:.1f}" if x else "-"  # noqa: E731
            row = [str(length), bias, f"{r['ms']:.0f}" if r else "-", gf(r), f"{e['ms']:.0f}" if e else "not run",
                   gf(e), f"{e['ms'] / r['ms']:.1f}x" if r and e else "-", f"{r['mib']:.0f}" if r else "-",
                   f"{e['mib']:.0f}" if e else "-"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
