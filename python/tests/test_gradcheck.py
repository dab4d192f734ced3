"""torch.autograd.gradcheck in double for every bias module: q, k, v and the module's parameters."""

import pytest
import torch

import relbias
from conftest import KINDS, make_bias


def check(bias, causal, shape_q=(1, 6, 2, 3), shape_kv=(1, 6, 2, 3), **kw):
    """gradcheck of (q, k, v, *the module's parameters) -> relbias.attention(q, k, v, bias)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    names = [n for n, _ in bias.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in bias.parameters())

    def f(q, k, v, *values):
        for name, value in zip(names, values):  # gradcheck's inputs become the module's parameters
            replace_parameter(bias, name, value)
        return relbias.attention(q, k, v, bias, causal=causal, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def replace_parameter(module, dotted, value):
    """module.<dotted> = value (a plain tensor, so gradcheck can perturb it), without copying."""
    *path, last = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[last] = value


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_every_bias(kind):
    causal = kind in ("t5", "per_offset")
    check(make_bias(kind, 2, causal), causal)


def test_gradcheck_bidirectional_window_gqa_packed():
    check(make_bias("kerple_log", 4, False), False, shape_q=(1, 7, 4, 3), shape_kv=(1, 7, 2, 3), window=3)
    check(make_bias("t5", 2, False), False, shape_q=(1, 7, 2, 3), shape_kv=(1, 7, 2, 3), cu_seqlens=[0, 2, 7])
    check(make_bias("fire", 2, True), True, shape_q=(2, 7, 2, 3), shape_kv=(2, 7, 2, 3), seq_lengths=[4, 7], layout="bshd")
