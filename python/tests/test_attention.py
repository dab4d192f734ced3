"""relbias.attention against the tests' materialised PyTorch attention (reference.py): forward
and backward (q, k, v and the bias parameters), float and double, both layouts, causal and
bidirectional, windows, packed and padded batches, GQA, KV-cache positions, 16-bit K and V."""

import pytest
import torch

import relbias
from conftest import KINDS, make_bias
from reference import bias_matrix, reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def inputs(shape_q, shape_kv, dtype, seed=0, dim_v=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, dtype=dtype)
    v_shape = shape_kv if dim_v is None else shape_kv[:3] + (dim_v,)
    v = torch.randn(v_shape, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def compare(q, k, v, bias, dtype, **kw):
    """Forward and every gradient of relbias.attention against reference(); returns o."""
    ref_kw = {n: kw[n] for n in ("causal", "window", "scale", "q_start", "k_start", "cu_seqlens", "seq_lengths", "layout")
              if n in kw}
    o = relbias.attention(q, k, v, bias, **kw)
    r = reference(q, k, v, bias, **ref_kw)
    tol = TOL[dtype]
    torch.testing.assert_close(o, r, atol=tol, rtol=tol)
    g = torch.randn_like(o)
    params = [p for p in bias.parameters() if p.requires_grad]
    got = torch.autograd.grad((o * g).sum(), [q, k, v] + params, retain_graph=True)
    want = torch.autograd.grad((r * g).sum(), [q, k, v] + params, allow_unused=True)
    for name, a, b in zip(["dq", "dk", "dv"] + [n for n, p in bias.named_parameters() if p.requires_grad], got, want):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol * 10, msg=lambda m: f"{name}: {m}")
    return o


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_every_bias_against_reference(kind, dtype, causal):
    bias = make_bias(kind, 4, causal, dtype)
    q, k, v = inputs((2, 13, 4, 8), (2, 13, 4, 8), dtype)
    compare(q, k, v, bias, dtype, causal=causal)


@pytest.mark.parametrize("kind", ["alibi", "t5", "kerple_power", "fire"])
def test_bhsd_layout_and_strided_inputs(kind):
    dtype = torch.float64
    bias = make_bias(kind, 4, True, dtype)
    q, k, v = inputs((2, 4, 11, 8), (2, 4, 11, 8), dtype)
    o = compare(q, k, v, bias, dtype, causal=True, layout="bhsd")
    assert o.shape == (2, 4, 11, 8)
    # The same values as [b, s, h, d] views of a fused projection (no copies): same result.
    fused = torch.cat([t.detach().transpose(1, 2) for t in (q, k, v)], dim=-1)  # [b, s, h, 3d], strided
    qs, ks, vs = fused[..., :8], fused[..., 8:16], fused[..., 16:]
    assert not qs.is_contiguous()
    torch.testing.assert_close(relbias.attention(qs, ks, vs, bias, causal=True), o.detach().transpose(1, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sliding_window(causal, dtype):
    for kind in ("kerple_log", "t5", "fire"):
        bias = make_bias(kind, 2, causal, dtype)
        q, k, v = inputs((1, 17, 2, 4), (1, 17, 2, 4), dtype)
        compare(q, k, v, bias, dtype, causal=causal, window=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_batch(dtype):
    for kind in ("alibi_trainable", "per_offset", "fire"):
        bias = make_bias(kind, 2, True, dtype)
        q, k, v = inputs((1, 16, 2, 4), (1, 16, 2, 4), dtype)
        o = compare(q, k, v, bias, dtype, causal=True, cu_seqlens=[0, 3, 10, 14])  # rows 14, 15: outside every sequence
        assert o[0, 14:].abs().max() == 0
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    compare(*inputs((1, 16, 2, 4), (1, 16, 2, 4), dtype), make_bias("kerple_power", 2, False, dtype), dtype, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_batch(dtype):
    for kind in ("t5", "kerple_power", "sandwich"):
        bias = make_bias(kind, 2, False, dtype)
        q, k, v = inputs((3, 9, 2, 4), (3, 9, 2, 4), dtype)
        o = compare(q, k, v, bias, dtype, seq_lengths=[5, 9, 0])
        assert o[0, 5:].abs().max() == 0 and o[2].abs().max() == 0
        (o.sum()).backward()
        assert q.grad[0, 5:].abs().max() == 0 and k.grad[0, 5:].abs().max() == 0 and v.grad[2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_grouped_query_attention(dtype, layout):
    for kind in ("alibi", "t5", "fire"):
        bias = make_bias(kind, 6, True, dtype)
        shape_q, shape_kv = ((2, 10, 6, 4), (2, 10, 2, 4)) if layout == "bshd" else ((2, 6, 10, 4), (2, 2, 10, 4))
        q, k, v = inputs(shape_q, shape_kv, dtype)
        compare(q, k, v, bias, dtype, causal=True, layout=layout)


def test_kv_cache_positions_scale_and_value_dim():
    dtype = torch.float64
    for kind in ("kerple_log", "fire", "t5"):
        bias = make_bias(kind, 2, True, dtype)
        q, k, v = inputs((2, 3, 2, 4), (2, 12, 2, 4), dtype, dim_v=5)  # 3 new queries at positions 9..11
        compare(q, k, v, bias, dtype, causal=True, q_start=9, scale=0.7)


def test_lse():
    dtype = torch.float64
    bias = make_bias("alibi", 2, True, dtype)
    q, k, v = inputs((1, 7, 2, 4), (1, 7, 2, 4), dtype)
    o, lse = relbias.attention(q, k, v, bias, causal=True, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2 + bias_matrix(bias, 7, 7)
    s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=0)
    assert not lse.requires_grad and lse.shape == (1, 2, 7)
    # A query that sees no key: o = 0, lse = -inf, no NaN anywhere.
    o, lse = relbias.attention(q, k, v, bias, causal=True, q_start=0, k_start=3, return_lse=True)
    assert torch.isneginf(lse[0, :, 0]).all() and o[0, 0].abs().max() == 0
    o.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_16_bit_keys_and_values_forward(storage):
    bias = make_bias("kerple_log", 4, True, torch.float32)
    q, k, v = (t.detach() for t in inputs((1, 9, 4, 8), (1, 9, 2, 8), torch.float32))
    k16, v16 = k.to(storage), v.to(storage)
    o = relbias.attention(q, k16, v16, bias, causal=True)
    assert o.dtype == torch.float32
    r = reference(q.double(), k16.double(), v16.double(), bias, causal=True)  # the widened values, exactly
    torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="forward only"):
        relbias.attention(q.requires_grad_(), k16, v16, bias, causal=True)


def test_threads_are_deterministic_and_default_to_torch():
    dtype = torch.float32
    bias = make_bias("t5", 4, True, dtype)
    q, k, v = inputs((2, 40, 4, 8), (2, 40, 4, 8), dtype)
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads in (1, 2, None):
            o = relbias.attention(q, k, v, bias, causal=True, num_threads=threads)
            results.append((o, torch.autograd.grad(o.sum(), [q, k, v, bias.relative_attention_bias.weight])))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(results[1][1], results[2][1]))  # None: torch.get_num_threads() == 2
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)


def test_training_step_moves_every_learned_bias():
    for kind in ("alibi_trainable", "t5", "per_offset", "kerple_power", "kerple_log", "fire"):
        bias = make_bias(kind, 2, True, torch.float32)
        before = [p.detach().clone() for p in bias.parameters()]
        optimiser = torch.optim.SGD(bias.parameters(), lr=0.1)
        q, k, v = inputs((1, 12, 2, 4), (1, 12, 2, 4), torch.float32)
        relbias.attention(q, k, v, bias, causal=True).square().sum().backward()
        optimiser.step()
        if hasattr(bias, "project"):
            bias.project()
        assert any(not torch.equal(a, b) for a, b in zip(before, bias.parameters())), kind


def test_the_gil_is_released_inside_the_kernels():
    import threading
    import time

    q, k, v = (t.detach() for t in inputs((1, 3072, 4, 32), (1, 3072, 4, 32), torch.float32))
    bias = make_bias("fire", 4, False, torch.float32)
    done, took = threading.Event(), []

    def work():
        start = time.perf_counter()
        relbias.attention(q, k, v, bias)  # bidirectional FIRE on one thread: 0.2 s or more, far above a time slice
        took.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=work)
    longest_gap, last = 0.0, time.perf_counter()
    worker.start()  # (a call that held the GIL could stall this thread here already)
    while not done.is_set():  # pure Python: it stalls for the whole call if the call holds the GIL
        now = time.perf_counter()
        longest_gap, last = max(longest_gap, now - last), now
    worker.join()
    assert longest_gap < took[0] / 2, (longest_gap, took[0])


def test_packed_cross_attention_with_separate_query_and_key_rows():
    from reference import attend

    dtype = torch.float64
    bias = make_bias("kerple_log", 2, False, dtype)
    q, k, v = inputs((1, 5, 2, 4), (1, 9, 2, 4), dtype)
    cu_q, cu_k = [0, 2, 5], [0, 4, 9]
    o = relbias.attention(q, k, v, bias, cu_seqlens=(cu_q, torch.tensor(cu_k)))
    r = torch.cat([attend(q[0, cu_q[s]:cu_q[s + 1]], k[0, cu_k[s]:cu_k[s + 1]], v[0, cu_k[s]:cu_k[s + 1]], bias) for s in (0, 1)])
    torch.testing.assert_close(o[0], r, atol=1e-12, rtol=0)
    got = torch.autograd.grad(o.sum(), [q, k, v, bias.r1, bias.r2])
    want = torch.autograd.grad(r.sum(), [q, k, v, bias.r1, bias.r2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
