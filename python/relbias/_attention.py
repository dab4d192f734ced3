"""relbias.attention: the fused forward and backward as a torch.autograd.Function.

Route: the tensors never leave PyTorch and nothing links against libtorch. The Python side
checks devices, dtypes and layouts, allocates the outputs with torch, and hands the extension
module each tensor's data_ptr(), shape and strides; relbias's tensor_view reads any strides whose
last axis is contiguous, so [batch, seq, heads, dim] and [batch, heads, seq, dim] (or slices of a
fused QKV projection) go in without copies. The bias module's parameters travel as one flat
tensor (BiasModule.flat_parameters()), an input of the Function, so its gradient (the kernel's
bias_grad) flows back to each nn.Parameter through autograd.
"""

from __future__ import annotations

import torch

from . import _relbias
from .bias import BiasModule

__all__ = ["attention"]

_LAYOUTS = ("bshd", "bhsd")
_HALF = (torch.float16, torch.bfloat16)


def _fail(message):
    raise ValueError("relbias.attention: " + message)


def _check_tensor(name, t, layout):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        _fail(f"{name} is on device {t.device}; relbias runs on the CPU only (move the tensors with .cpu())")
    if t.dim() != 4:
        _fail(f"{name} must be 4-D [{', '.join(_axes(layout))}], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        _fail(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
              "call .contiguous() on it")


def _axes(layout):
    return ("batch", "seq", "heads", "dim") if layout == "bshd" else ("batch", "heads", "seq", "dim")


def _desc(t, layout):
    """(data pointer, batch, seq, heads, dim, batch stride, seq stride, head stride)."""
    b, x, y, d = t.shape
    sb, sx, sy, _ = t.stride()
    if layout == "bshd":
        return (t.data_ptr(), b, x, y, d, sb, sx, sy)
    return (t.data_ptr(), b, y, x, d, sb, sy, sx)


def _empty(like_shape, layout, seq, heads, dim, dtype):
    batch = like_shape[0]
    shape = (batch, seq, heads, dim) if layout == "bshd" else (batch, heads, seq, dim)
    return torch.empty(shape, dtype=dtype)


def _span(t):
    return (t.data_ptr(), t.numel()) if t is not None and t.numel() > 0 else (0, 0)


def _index_list(name, values):
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            _fail(f"{name} is on device {values.device}; pass it on the CPU")
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dim() != 1:
            _fail(f"{name} must be a 1-D integer tensor or a list of ints, got {values.dtype} of shape {tuple(values.shape)}")
        return [int(x) for x in values.tolist()]
    return [int(x) for x in values]


def _options(causal, window, scale, cu_seqlens, seq_lengths, q_start, k_start, num_threads):
    options = _relbias.Options()
    options.causal = bool(causal)
    if window is not None:
        options.window = int(window)
    if scale is not None:
        options.scale = float(scale)
    options.q_start = int(q_start)
    options.k_start = int(k_start)
    if cu_seqlens is not None and seq_lengths is not None:
        _fail("give cu_seqlens (a packed batch) or seq_lengths (a padded batch), not both")
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, (tuple, list)) and len(cu_seqlens) == 2 and not isinstance(cu_seqlens[0], int):
            options.cu_seqlens_q = _index_list("cu_seqlens_q", cu_seqlens[0])  # (cu_seqlens_q, cu_seqlens_k)
            options.cu_seqlens_k = _index_list("cu_seqlens_k", cu_seqlens[1])
        else:
            options.cu_seqlens_q = _index_list("cu_seqlens", cu_seqlens)
        if not options.cu_seqlens_q:
            _fail("cu_seqlens needs one entry per sequence plus one, got none")
    if seq_lengths is not None:
        options.seq_lengths = _index_list("seq_lengths", seq_lengths)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        _fail(f"num_threads must be >= 1, got {threads}")
    options.num_threads = threads
    return options


class _Attention(torch.autograd.Function):
    """Inputs q, k, v, the bias's flat parameters (or None); config holds the rest."""

    @staticmethod
    def forward(ctx, q, k, v, params, config):
        layout, spec, options = config
        qd, kd, vd = (_desc(t, layout) for t in (q, k, v))
        batch, seq, heads = qd[1], qd[2], qd[3]
        out_dtype = torch.float32 if k.dtype in _HALF else q.dtype
        o = _empty(q.shape, layout, seq, heads, vd[4], out_dtype)
        lse = torch.empty((batch, heads, seq), dtype=out_dtype)
        if params is not None:
            spec.params = _span(params)
        _relbias.forward(str(k.dtype).removeprefix("torch."), qd, kd, vd, spec, options, _desc(o, layout), _span(lse))
        ctx.config = config
        ctx.save_for_backward(q, k, v, o, lse, params)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, d_o, d_lse):
        layout, spec, options = ctx.config
        q, k, v, o, lse, params = ctx.saved_tensors
        if d_o is None:
            d_o = torch.zeros_like(o)
        if d_o.stride(-1) != 1 or 0 in d_o.stride():
            d_o = d_o.contiguous()  # an expanded gradient (from .sum()) has stride 0
        dq = torch.empty(q.shape, dtype=q.dtype)  # contiguous in the call's layout
        dk = torch.empty(k.shape, dtype=k.dtype)
        dv = torch.empty(v.shape, dtype=v.dtype)
        bias_grad = None
        if params is not None:
            spec.params = _span(params)
            if ctx.needs_input_grad[3]:
                bias_grad = torch.zeros_like(params)  # the kernel accumulates (+=)
        _relbias.backward(str(q.dtype).removeprefix("torch."), _desc(q, layout), _desc(k, layout), _desc(v, layout),
                          _desc(o, layout), _desc(d_o, layout), _span(lse), spec, options, _desc(dq, layout),
                          _desc(dk, layout), _desc(dv, layout), _span(bias_grad))
        return dq, dk, dv, bias_grad, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: BiasModule, *, causal: bool = False,
              window: int | None = None, scale: float | None = None, cu_seqlens=None, seq_lengths=None, q_start: int = 0,
              k_start: int = 0, return_lse: bool = False, layout: str = "bshd", num_threads: int | None = None):
    """O = softmax(scale * Q K^T + B + mask) V with B[h][r][c] = bias(h, q_start + r, k_start + c), fused.

    Shapes (layout="bshd", the default): q [B, Lq, Hq, D], k [B, Lk, Hk, D], v [B, Lk, Hk, Dv],
    returns o [B, Lq, Hq, Dv]; layout="bhsd" swaps the seq and heads axes of all four. Hq must
    be a multiple of Hk (grouped- and multi-query attention) and equal bias.heads. Any strides
    work as long as the last dimension is contiguous; nothing is copied.

    dtypes: q, k, v all float32 or all float64 (forward and backward: gradients reach q, k, v
    and the bias module's parameters); or q float32 with k and v both float16 or both bfloat16
    (a KV cache: forward only, o in float32).

    causal: a query sees keys at positions <= its own. window: sliding window of w keys
    (causal i - w < j <= i; bidirectional |i - j| < w). scale: multiplies Q K^T (default
    1/sqrt(D); T5 uses 1). q_start, k_start: absolute positions of the first query and key row.
    cu_seqlens: a packed batch (B = 1), sequence s in rows [cu[s], cu[s+1]), positions from 0 in
    each; a pair (cu_seqlens_q, cu_seqlens_k) for different query and key rows. seq_lengths: a
    padded batch (self-attention, right padding): element b holds seq_lengths[b] tokens. Padding
    rows get o = 0 and pass no gradient.
    return_lse: also return the row log-sum-exp [B, Hq, Lq] (no gradient flows through it; -inf
    for a row that sees no key). num_threads: default torch.get_num_threads().

    The bias module's values are checked on every call (KERPLE's ranges: call project() after
    each optimiser step). The kernels run with the GIL released; the backward is deterministic
    for a given thread count.

    Raises ValueError for bad shapes, dtypes, devices (CUDA tensors), non-contiguous last
    dimensions and anything relbias's C++ entry points reject (same message).
    """
    if layout not in _LAYOUTS:
        _fail(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, layout)
    if not isinstance(bias, BiasModule):
        _fail(f"bias must be a relbias bias module (relbias.ALiBi, relbias.T5Bias, ...), got {type(bias).__name__}")
    if k.dtype != v.dtype:
        _fail(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    if k.dtype in _HALF:
        if q.dtype != torch.float32:
            _fail(f"with {k.dtype} k and v, q must be float32, got {q.dtype}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            _fail(f"{k.dtype} k and v are for inference (forward only): widen them to float32 to train, "
                  "or call under torch.no_grad()")
        scalar = torch.float32
    elif q.dtype in (torch.float32, torch.float64):
        if k.dtype != q.dtype:
            _fail(f"q, k and v must have the same dtype (float32 or float64), got {q.dtype}, {k.dtype}, {v.dtype}")
        scalar = q.dtype
    else:
        _fail(f"q must be float32 or float64 (k and v may be float16/bfloat16 with a float32 q), got {q.dtype}")

    params = bias.flat_parameters()
    if params is not None:
        if params.device.type != "cpu":
            _fail(f"the bias module's parameters are on device {params.device}; relbias runs on the CPU only")
        params = params.to(scalar).contiguous()
    options = _options(causal, window, scale, cu_seqlens, seq_lengths, q_start, k_start, num_threads)
    o, lse = _Attention.apply(q, k, v, params, (layout, bias.spec(), options))
    return (o, lse) if return_lse else o
