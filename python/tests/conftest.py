import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # reference.py
# One thread: the suite's calls are tiny, and OpenMP threads that wait at barriers on a busy 2-vCPU
# machine cost more than the work (test_threads sets 2 itself).
torch.set_num_threads(1)


def make_bias(kind, heads, causal=False, dtype=torch.float64, seed=1):
    """Every module with non-trivial values (seeded tables, not zeros)."""
    import relbias

    if kind == "none":
        m = relbias.NoBias(heads)
    elif kind == "alibi":
        m = relbias.ALiBi(heads)
    elif kind == "alibi_trainable":
        m = relbias.ALiBi(heads, trainable=True)
    elif kind == "t5":
        m = relbias.T5Bias(heads, causal, num_buckets=8, max_distance=12)
        m.reset_parameters(seed, d_model=4)
    elif kind == "per_offset":
        m = relbias.PerOffset(heads, causal, clip=4)
        m.reset_parameters(seed, std=0.5)
    elif kind == "kerple_power":
        m = relbias.KerplePower(heads, seed)
    elif kind == "kerple_log":
        m = relbias.KerpleLog(heads, seed)
    elif kind == "fire":
        m = relbias.FIRE(heads, seed, width=6, init_L=4.0)  # threshold 4: rows on both sides of it
    elif kind == "sandwich":
        m = relbias.Sandwich(heads, 8)
    else:
        raise ValueError(kind)
    return m.to(dtype)


KINDS = ["none", "alibi", "alibi_trainable", "t5", "per_offset", "kerple_power", "kerple_log", "fire", "sandwich"]
