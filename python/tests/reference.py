"""The tests' own plain implementation: each bias from its published formula (written here, not
taken from relbias.bias) and softmax(scale Q K^T + B + mask) V materialised in PyTorch."""

import math

import torch


def hf_t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """HF transformers T5Attention._relative_position_bucket, as published (relative = key - query)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, relative_position_if_large)


def bias_matrix(module, q_len, k_len, q_start=0, k_start=0, dtype=torch.float64):
    """[H, q_len, k_len] from the module's parameter tensors (differentiable) and the papers' formulas."""
    i = torch.arange(q_start, q_start + q_len).view(-1, 1)
    j = torch.arange(k_start, k_start + k_len).view(1, -1)
    delta = i - j
    dist = delta.abs().to(dtype)
    H = module.heads
    kind = module.kind
    if kind == "none":
        return torch.zeros(H, q_len, k_len, dtype=dtype)
    if kind == "alibi":  # Press et al.: -m_h |i - j|
        return -module.slopes.to(dtype).view(H, 1, 1) * dist
    if kind == "t5":  # table[bucket(j - i)][h]
        table = module.relative_attention_bias.weight.to(dtype)
        buckets = hf_t5_bucket(-delta, not module.causal, module.num_buckets, module.max_distance)
        return table[buckets].permute(2, 0, 1)
    if kind == "per_offset":  # Shaw et al. clipping
        table = module.table.to(dtype)
        index = delta.clamp(0, module.clip) if module.causal else delta.clamp(-module.clip, module.clip) + module.clip
        return table[:, index]
    if kind == "kerple_power":  # -r1 |i - j|^r2
        r1, r2 = module.r1.to(dtype).view(H, 1, 1), module.r2.to(dtype).view(H, 1, 1)
        safe = torch.where(dist > 0, dist, torch.ones_like(dist))
        return torch.where(dist > 0, -r1 * safe ** r2, torch.zeros((), dtype=dtype))
    if kind == "kerple_log":  # -r1 log(1 + r2 |i - j|)
        r1, r2 = module.r1.to(dtype).view(H, 1, 1), module.r2.to(dtype).view(H, 1, 1)
        return -r1 * torch.log(1 + r2 * dist)
    if kind == "fire":  # Li et al.: MLP(psi(|i - j|) / (psi(max(i, L)) + eps)), psi(x) = log(|c x| + 1)
        W1, b1, W2, b2 = (getattr(module, n).to(dtype) for n in ("W1", "b1", "W2", "b2"))
        c, Lm = module.c.to(dtype), module.L_multiplier.to(dtype)
        L = torch.abs(Lm * module.init_L)
        den = torch.log(torch.abs(c * torch.maximum(i.to(dtype), L)) + 1) + module.eps
        x = torch.log(torch.abs(c * dist) + 1) / den
        out = torch.relu(x[..., None] * W1 + b1) @ W2.T + b2
        return out.permute(2, 0, 1)
    if kind == "sandwich":  # Chi et al. 2023 / NeMo
        d = module.dim
        k = torch.arange(1, d // 2 + 1, dtype=torch.float64)
        s = torch.cos(dist.to(torch.float64)[..., None] / 10000.0 ** (2 * k / d)).sum(-1) - d / 2
        h = torch.arange(H, dtype=torch.float64).view(H, 1, 1)
        return (s * H / (8 * (h + 1))).to(dtype)
    raise ValueError(kind)


def visible(q_len, k_len, q_start, k_start, causal, window):
    i = torch.arange(q_start, q_start + q_len).view(-1, 1)
    j = torch.arange(k_start, k_start + k_len).view(1, -1)
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j < window) if causal else ((i - j).abs() < window)
    return keep


def attend(q, k, v, bias, causal=False, window=None, scale=None, q_start=0, k_start=0):
    """One sequence, [Lq, Hq, D] x [Lk, Hk, D]: the materialised attention (rows seeing nothing -> 0)."""
    Lq, Hq, D = q.shape
    Lk, Hk, _ = k.shape
    group = Hq // Hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q, k) * scale + bias_matrix(bias, Lq, Lk, q_start, k_start, q.dtype)
    keep = visible(Lq, Lk, q_start, k_start, causal, window)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


def reference(q, k, v, bias, causal=False, window=None, scale=None, q_start=0, k_start=0, cu_seqlens=None, seq_lengths=None,
              layout="bshd"):
    """The batch, [B, L, H, D] (or bhsd), sequence by sequence as relbias.attention defines it."""
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if cu_seqlens is not None:  # packed: batch element 0, sequence s in rows [cu[s], cu[s + 1])
        segments = [[(cu_seqlens[s], cu_seqlens[s + 1]) for s in range(len(cu_seqlens) - 1)]]
    elif seq_lengths is not None:  # padded: element b in rows [0, n_b)
        segments = [[(0, n)] for n in seq_lengths]
    else:
        segments = None
    batch = []
    for b in range(q.shape[0]):
        if segments is None:
            batch.append(attend(q[b], k[b], v[b], bias, causal, window, scale, q_start, k_start))
            continue
        parts, at = [], 0
        for lo, hi in segments[b]:
            parts.append(torch.zeros((lo - at,) + q.shape[2:3] + v.shape[3:], dtype=q.dtype))
            parts.append(attend(q[b, lo:hi], k[b, lo:hi], v[b, lo:hi], bias, causal, window, scale))
            at = hi
        parts.append(torch.zeros((q.shape[1] - at,) + q.shape[2:3] + v.shape[3:], dtype=q.dtype))
        batch.append(torch.cat(parts))
    out = torch.stack(batch)
    return out.transpose(1, 2) if layout == "bhsd" else out
