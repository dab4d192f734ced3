"""relbias for PyTorch: relative positional attention biases with fused CPU attention.

    import relbias
    bias = relbias.ALiBi(heads=8)                       # or T5Bias, KerplePower, FIRE, ...
    o = relbias.attention(q, k, v, bias, causal=True)   # q, k, v [batch, seq, heads, dim]
    o.sum().backward()                                  # gradients to q, k, v and bias parameters

The kernels are relbias's C++ fused forward and backward (include/relbias/attention*.hpp): they
never hold the (L, L) score matrix, and the backward is deterministic. See docs/python.md.
"""

from ._attention import attention
from .bias import ALiBi, BiasModule, FIRE, KerpleLog, KerplePower, NoBias, PerOffset, Sandwich, T5Bias

__all__ = ["attention", "BiasModule", "NoBias", "ALiBi", "T5Bias", "PerOffset", "KerplePower", "KerpleLog", "FIRE", "Sandwich"]
__version__ = "0.1.0"
