"""Bad calls raise ValueError with a message naming the argument (relbias's own C++ messages for
what the kernels check)."""

import pytest
import torch

import relbias


def qkv(shape=(1, 5, 2, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def test_devices():
    q, k, v = qkv()
    meta = torch.empty(1, 5, 2, 4, device="meta")
    with pytest.raises(ValueError, match="k is on device meta; relbias runs on the CPU only"):
        relbias.attention(q, meta, v, relbias.NoBias(2))
    if torch.cuda.is_available():  # not on the CI machine; the same check as any non-CPU device
        with pytest.raises(ValueError, match="cuda"):
            relbias.attention(q.cuda(), k, v, relbias.NoBias(2))


def test_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        relbias.attention(q[0], k, v, relbias.NoBias(2))
    with pytest.raises(ValueError, match="relbias::attention"):  # heads of the bias
        relbias.attention(q, k, v, relbias.ALiBi(3))
    with pytest.raises(ValueError, match="relbias::attention"):  # dim of k
        relbias.attention(q, k[..., :3].contiguous(), v, relbias.NoBias(2))
    with pytest.raises(ValueError, match="relbias::attention"):  # Hq not a multiple of Hk
        relbias.attention(torch.randn(1, 5, 3, 4), k, v, relbias.NoBias(3))
    with pytest.raises(ValueError, match="layout"):
        relbias.attention(q, k, v, relbias.NoBias(2), layout="sbhd")


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same dtype"):
        relbias.attention(q, k.double(), v.double(), relbias.NoBias(2))
    with pytest.raises(ValueError, match="q must be float32, got torch.float16"):
        relbias.attention(q.half(), k.half(), v.half(), relbias.NoBias(2))
    with pytest.raises(ValueError, match="q must be float32"):
        relbias.attention(q.double(), k.bfloat16(), v.bfloat16(), relbias.NoBias(2))
    with pytest.raises(ValueError, match="same dtype"):
        relbias.attention(q, k.bfloat16(), v.half(), relbias.NoBias(2))
    with pytest.raises(ValueError, match="q must be float32 or float64"):
        relbias.attention(q.int(), k, v, relbias.NoBias(2))


def test_non_contiguous_last_dimension():
    q, k, v = qkv((1, 5, 2, 4))
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        relbias.attention(q.transpose(1, 3).contiguous().transpose(1, 3), k, v, relbias.NoBias(2))
    with pytest.raises(ValueError, match="v must have a contiguous last dimension"):
        relbias.attention(q, k, torch.randn(1, 5, 2, 8)[..., ::2], relbias.NoBias(2))


def test_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="built for causal attention but options.mask is bidirectional"):  # a causal T5 table in bidirectional attention
        relbias.attention(q, k, v, relbias.T5Bias(2, causal=True))
    with pytest.raises(ValueError, match="sliding_window"):
        relbias.attention(q, k, v, relbias.NoBias(2), window=0)
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 9"):
        relbias.attention(q, k, v, relbias.NoBias(2), cu_seqlens=[0, 2, 9])
    with pytest.raises(ValueError, match=r"must not decrease \(sequences overlap\)"):
        relbias.attention(q, k, v, relbias.NoBias(2), cu_seqlens=[0, 3, 2])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6 exceeds padded_length = 5"):
        relbias.attention(q, k, v, relbias.NoBias(2), seq_lengths=[6])
    with pytest.raises(ValueError, match="not both"):
        relbias.attention(q, k, v, relbias.NoBias(2), seq_lengths=[5], cu_seqlens=[0, 5])
    with pytest.raises(ValueError, match="bias must be a relbias bias module"):
        relbias.attention(q, k, v, torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="num_threads"):
        relbias.attention(q, k, v, relbias.NoBias(2), num_threads=0)


def test_bad_learned_values_fail_at_the_call():
    q, k, v = qkv()
    bias = relbias.KerpleLog(2)
    with torch.no_grad():
        bias.r2.fill_(-1.0)  # an optimiser step without project()
    with pytest.raises(ValueError, match="r2"):
        relbias.attention(q, k, v, bias)
    t5 = relbias.T5Bias(2, False)
    with torch.no_grad():
        t5.relative_attention_bias.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        relbias.attention(q, k, v, t5)
