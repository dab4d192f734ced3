"""Bias modules: relbias's policies as torch.nn.Modules.

Every module describes its C++ policy (include/relbias/bias/*.hpp) to the fused kernels: the
kind, its configuration, and its learned values, which are ``torch.nn.Parameter``s laid out so
that ``flat_parameters()`` is the C++ policy's ``parameters()`` vector. The kernels rebuild the
policy from those values on every call (a few hundred numbers at most), so an optimiser step on
the parameters is all a training loop needs; gradients arrive through relbias.attention's
backward (the fused kernel's bias_grad).

``materialize(q_len, k_len)`` evaluates the same bias as a dense, differentiable
[heads, q_len, k_len] tensor in plain PyTorch: an eager fallback (other devices, plotting, the
benchmark's baseline). Positions: query row r sits at q_start + r, key column c at k_start + c,
delta = i - j (> 0: the key is in the past).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _relbias

__all__ = ["BiasModule", "NoBias", "ALiBi", "T5Bias", "PerOffset", "KerplePower", "KerpleLog", "FIRE", "Sandwich"]


def _offsets(q_len, k_len, q_start, k_start, device=None):
    """(query positions [q_len, 1], key positions [1, k_len]) as int64."""
    i = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    j = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    return i, j


def _values(values, count, name, dtype=torch.float64):
    """Known values as a 1-D tensor of `count` entries (ValueError otherwise)."""
    tensor = torch.as_tensor(values, dtype=dtype).detach().clone().reshape(-1)
    if tensor.numel() != count:
        raise ValueError(f"relbias: {name} needs {count} values, got {tensor.numel()}")
    return tensor


class BiasModule(nn.Module):
    """Base class: ``kind``, ``heads`` and, for T5 and per-offset, the mode ``causal``."""

    kind = ""
    causal = False

    def __init__(self, heads: int):
        super().__init__()
        if int(heads) < 1:
            raise ValueError(f"relbias.{type(self).__name__}: heads must be >= 1, got {heads}")
        self.heads = int(heads)

    def flat_parameters(self) -> torch.Tensor | None:
        """The learned (or fixed) values in the C++ policy's parameters() layout, or None."""
        return None

    def _configure(self, spec) -> None:
        """Sets the policy's configuration fields of a _relbias.BiasSpec."""

    def spec(self):
        """A _relbias.BiasSpec without parameter values (relbias.attention adds them)."""
        spec = _relbias.BiasSpec()
        spec.kind = self.kind
        spec.heads = self.heads
        spec.causal = bool(self.causal)
        self._configure(spec)
        return spec

    def check(self) -> None:
        """Raises ValueError if the C++ policy rejects the current values (as a call would)."""
        spec = self.spec()
        flat = self.flat_parameters()
        keep = None
        if flat is not None:
            keep = flat.detach().to(device="cpu", dtype=torch.float64).contiguous()
            spec.params = (keep.data_ptr(), keep.numel())
        _relbias.check_bias(spec)

    def materialize(self, q_len: int, k_len: int, q_start: int = 0, k_start: int = 0) -> torch.Tensor:
        """The bias as a dense [heads, q_len, k_len] tensor (differentiable), plain PyTorch."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class NoBias(BiasModule):
    """No bias: the baseline. bias(h, i, j) = 0."""

    kind = "none"

    def materialize(self, q_len, k_len, q_start=0, k_start=0, dtype=None):
        return torch.zeros(self.heads, q_len, k_len, dtype=dtype)


class ALiBi(BiasModule):
    """ALiBi (Press et al., 2022): bias(h, i, j) = -m_h |i - j|.

    Slopes m_h from the authors' get_slopes(heads) (max_bias = 8), ggml's formula for another
    max_bias, or ``slopes`` given. ``trainable=True`` makes the slopes an nn.Parameter (the C++
    alibi<S, true>); otherwise they are a buffer.
    """

    kind = "alibi"

    def __init__(self, heads: int, trainable: bool = False, max_bias: float = 8.0, slopes=None):
        super().__init__(heads)
        if slopes is None:
            values = torch.tensor(_relbias.alibi_slopes(self.heads, float(max_bias)), dtype=torch.float32)
        else:
            values = _values(slopes, self.heads, "ALiBi slopes", torch.float32)
        self.trainable = bool(trainable)
        if self.trainable:
            self.slopes = nn.Parameter(values)
        else:
            self.register_buffer("slopes", values)
        self.check()

    def flat_parameters(self):
        return self.slopes

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        i, j = _offsets(q_len, k_len, q_start, k_start, self.slopes.device)
        return -self.slopes.view(-1, 1, 1) * (i - j).abs().to(self.slopes.dtype)

    def extra_repr(self):
        return f"heads={self.heads}, trainable={self.trainable}"


def t5_relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                                max_distance: int = 128) -> torch.Tensor:
    """HF transformers' T5Attention._relative_position_bucket (relative_position = key - query)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) *
                         (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class T5Bias(BiasModule):
    """T5's bucketed bias (Raffel et al., 2020; HF T5Attention): bias(h, i, j) = table[bucket(j - i)][h].

    The table is ``relative_attention_bias.weight`` [num_buckets, heads], an nn.Embedding as in
    HF, so a checkpoint's tensor loads directly::

        bias = T5Bias(heads=8, causal=False)
        bias.relative_attention_bias.weight.data.copy_(hf_layer.relative_attention_bias.weight)
        # or T5Bias.from_pretrained(hf_weight, causal=False)

    ``causal`` selects HF's decoder bucketing and must match the attention's ``causal``. T5 uses
    scale = 1. A new table is zero, as in C++; ``reset_parameters(seed, d_model)`` draws HF's
    initialisation (normal(0, factor / sqrt(d_model))) from relbias's C++ random stream.
    """

    kind = "t5"

    def __init__(self, heads: int, causal: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__(heads)
        self.causal = bool(causal)
        self.num_buckets = int(num_buckets)
        self.max_distance = int(max_distance)
        self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads)
        nn.init.zeros_(self.relative_attention_bias.weight)
        self.check()

    @classmethod
    def from_pretrained(cls, weight: torch.Tensor, causal: bool, max_distance: int = 128) -> "T5Bias":
        """A T5Bias holding a checkpoint's relative_attention_bias.weight [num_buckets, heads]."""
        if weight.dim() != 2:
            raise ValueError(f"relbias.T5Bias.from_pretrained: weight must be [num_buckets, heads], got {tuple(weight.shape)}")
        module = cls(weight.shape[1], causal, weight.shape[0], max_distance)
        with torch.no_grad():
            module.relative_attention_bias.weight.copy_(weight)
        module.check()
        return module

    def reset_parameters(self, seed: int = 0, d_model: float = 512.0, factor: float = 1.0) -> None:
        values = _relbias.t5_init(self.heads, self.causal, self.num_buckets, self.max_distance, int(seed), float(d_model),
                                  float(factor))
        with torch.no_grad():
            self.relative_attention_bias.weight.copy_(torch.tensor(values).view(self.num_buckets, self.heads))

    def _configure(self, spec):
        spec.num_buckets = self.num_buckets
        spec.max_distance = self.max_distance

    def flat_parameters(self):
        return self.relative_attention_bias.weight.reshape(-1)  # element (bucket, h) at bucket * H + h

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        weight = self.relative_attention_bias.weight
        i, j = _offsets(q_len, k_len, q_start, k_start, weight.device)
        buckets = t5_relative_position_bucket(j - i, not self.causal, self.num_buckets, self.max_distance)
        return weight[buckets].permute(2, 0, 1)

    def extra_repr(self):
        return f"heads={self.heads}, causal={self.causal}, num_buckets={self.num_buckets}, max_distance={self.max_distance}"


class PerOffset(BiasModule):
    """A learned bias per clipped offset (Shaw et al., 2018 clipping).

    Bidirectional: table[h][clamp(i - j, -clip, clip) + clip] (2 clip + 1 entries per head);
    causal: table[h][clamp(i - j, 0, clip)] (clip + 1 entries). ``table`` [heads, entries] starts
    at zero; ``reset_parameters(seed, std)`` draws normal(0, std) as the C++ policy does.
    """

    kind = "per_offset"

    def __init__(self, heads: int, causal: bool, clip: int):
        super().__init__(heads)
        if int(clip) < 0:
            raise ValueError(f"relbias.PerOffset: clip must be >= 0, got {clip}")
        self.causal = bool(causal)
        self.clip = int(clip)
        entries = self.clip + 1 if self.causal else 2 * self.clip + 1
        self.table = nn.Parameter(torch.zeros(self.heads, entries))
        self.check()

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        values = _relbias.per_offset_init(self.heads, self.causal, self.clip, int(seed), float(std))
        with torch.no_grad():
            self.table.copy_(torch.tensor(values).view_as(self.table))

    def _configure(self, spec):
        spec.clip = self.clip

    def flat_parameters(self):
        return self.table.reshape(-1)

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        i, j = _offsets(q_len, k_len, q_start, k_start, self.table.device)
        if self.causal:
            index = (i - j).clamp(0, self.clip)
        else:
            index = (i - j).clamp(-self.clip, self.clip) + self.clip
        return self.table[:, index]

    def extra_repr(self):
        return f"heads={self.heads}, causal={self.causal}, clip={self.clip}"


class _Kerple(BiasModule):
    """What KERPLE power and log share: r1, r2 [heads] each, seeded as the reference, project()."""

    upper = math.inf

    def __init__(self, heads: int, seed: int = 0, r1=None, r2=None):
        super().__init__(heads)
        if (r1 is None) != (r2 is None):
            raise ValueError(f"relbias.{type(self).__name__}: give both r1 and r2, or neither")
        if r1 is None:
            init = getattr(_relbias, self.kind + "_init")(self.heads, int(seed))
            r1, r2 = init[:self.heads], init[self.heads:]
        self.r1 = nn.Parameter(_values(r1, self.heads, "r1", torch.float32))
        self.r2 = nn.Parameter(_values(r2, self.heads, "r2", torch.float32))
        self.check()

    def flat_parameters(self):
        return torch.cat([self.r1, self.r2])  # [r1 (H), r2 (H)]

    @torch.no_grad()
    def project(self) -> None:
        """The reference's projection after an optimiser step: r1 >= 1e-2, r2 in [1e-2, upper]."""
        self.r1.clamp_(min=1e-2)
        self.r2.clamp_(min=1e-2, max=self.upper)

    def _distance(self, q_len, k_len, q_start, k_start):
        i, j = _offsets(q_len, k_len, q_start, k_start, self.r1.device)
        return (i - j).abs().to(self.r1.dtype)


class KerplePower(_Kerple):
    """KERPLE power (Chi et al., 2022): bias(h, i, j) = -r1_h |i - j|^r2_h, r1 > 0, 0 < r2 <= 2.

    Seeded as the reference (r1 ~ U(0, 1), r2 ~ U(0, 2), then project()) by relbias's C++
    random stream, or from known ``r1`` and ``r2``. Call ``project()`` after every optimiser
    step: the kernels reject values outside the paper's constraints.
    """

    kind = "kerple_power"
    upper = 2.0

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        distance = self._distance(q_len, k_len, q_start, k_start)
        powered = torch.where(distance > 0, distance.clamp(min=1).pow(self.r2.view(-1, 1, 1)), torch.zeros(()))
        return -self.r1.view(-1, 1, 1) * powered


class KerpleLog(_Kerple):
    """KERPLE log (Chi et al., 2022): bias(h, i, j) = -r1_h log(1 + r2_h |i - j|), r1, r2 > 0.

    Seeded as the reference (r1 ~ U(0, 2), r2 ~ U(0, 1), then project()), or from known values.
    Call ``project()`` after every optimiser step.
    """

    kind = "kerple_log"

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        distance = self._distance(q_len, k_len, q_start, k_start)
        return -self.r1.view(-1, 1, 1) * torch.log1p(self.r2.view(-1, 1, 1) * distance)


class FIRE(BiasModule):
    """FIRE (Li et al., ICLR 2024): a learned MLP of the log-normalised distance.

        bias(h, i, j) = MLP(psi(|i - j|) / (psi(max(i, L)) + eps))[h],  psi(x) = log(|c x| + 1),
        L = |L_multiplier * init_L|,  MLP(x)[h] = b2[h] + sum_k W2[h][k] relu(W1[k] x + b1[k])

    i is the absolute query position. Parameters W1, b1 [width], W2 [heads, width], b2 [heads],
    c and L_multiplier (scalars); init_L and eps are fixed. Seeded as the C++ policy (PyTorch's
    Linear initialisation, c = 0.1, L_multiplier = 1), or from known weights via ``weights=``
    (a dict of those six names).
    """

    kind = "fire"

    def __init__(self, heads: int, seed: int = 0, width: int = 32, init_L: float = 512.0, eps: float = 1e-6, weights=None):
        super().__init__(heads)
        self.width, self.init_L, self.eps = int(width), float(init_L), float(eps)
        if weights is None:
            flat = torch.tensor(_relbias.fire_init(self.heads, int(seed), self.width, self.init_L, self.eps), dtype=torch.float32)
            w, h = self.width, self.heads
            weights = {"W1": flat[:w], "b1": flat[w:2 * w], "W2": flat[2 * w:2 * w + h * w].view(h, w),
                       "b2": flat[2 * w + h * w:2 * w + h * w + h], "c": flat[-2], "L_multiplier": flat[-1]}
        else:
            self.width = int(torch.as_tensor(weights["W1"]).numel())
        shapes = {"W1": (self.width,), "b1": (self.width,), "W2": (self.heads, self.width), "b2": (self.heads,), "c": (),
                  "L_multiplier": ()}
        for name, shape in shapes.items():
            values = _values(weights[name], math.prod(shape), name, torch.float32).view(shape)
            setattr(self, name, nn.Parameter(values))
        self.check()

    def _configure(self, spec):
        spec.width = self.width
        spec.init_L = self.init_L
        spec.eps = self.eps

    def flat_parameters(self):
        return torch.cat([self.W1, self.b1, self.W2.reshape(-1), self.b2, self.c.view(1), self.L_multiplier.view(1)])

    def materialize(self, q_len, k_len, q_start=0, k_start=0):
        i, j = _offsets(q_len, k_len, q_start, k_start, self.W1.device)
        dtype = self.W1.dtype
        psi = lambda x: torch.log((self.c * x).abs() + 1)  # noqa: E731
        threshold = (self.L_multiplier * self.init_L).abs()
        normalizer = psi(torch.maximum(i.to(dtype), threshold)) + self.eps  # [q_len, 1]
        x = psi((i - j).abs().to(dtype)) / normalizer  # [q_len, k_len]
        hidden = torch.relu(x.unsqueeze(-1) * self.W1 + self.b1)  # [q_len, k_len, width]
        return (hidden @ self.W2.t() + self.b2).permute(2, 0, 1)

    def extra_repr(self):
        return f"heads={self.heads}, width={self.width}, init_L={self.init_L}, eps={self.eps}"


class Sandwich(BiasModule):
    """Sandwich (Chi et al., 2023; NeMo): a parameter-free sinusoidal bias.

        bias(h, i, j) = (sum_{k=1..d/2} cos(|i - j| / 10000^(2k/d)) - d/2) * heads / (8 (h + 1))

    d: the sinusoid dimension (NeMo: the head dimension), even >= 2.
    """

    kind = "sandwich"

    def __init__(self, heads: int, dim: int):
        super().__init__(heads)
        self.dim = int(dim)
        self.check()

    def _configure(self, spec):
        spec.dim = self.dim

    def materialize(self, q_len, k_len, q_start=0, k_start=0, dtype=None):
        """dtype: of the result (default torch.get_default_dtype(); computed in float64)."""
        i, j = _offsets(q_len, k_len, q_start, k_start)
        distance = (i - j).abs()
        # A function of |i - j| only: tabulated once per distance, then gathered.
        d = torch.arange(int(distance.max()) + 1 if distance.numel() else 1, dtype=torch.float64)
        k = torch.arange(1, self.dim // 2 + 1, dtype=torch.float64)
        waves = torch.cos(d.unsqueeze(-1) / torch.pow(10000.0, 2 * k / self.dim)).sum(-1) - self.dim / 2
        heads = torch.arange(self.heads, dtype=torch.float64).view(-1, 1)
        table = (waves * self.heads / (8 * (heads + 1))).to(dtype or torch.get_default_dtype())  # [heads, distances]
        return table[:, distance]

    def extra_repr(self):
        return f"heads={self.heads}, dim={self.dim}"
