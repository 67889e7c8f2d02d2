"""Naive attention: the textbook computation, with the full score matrix in memory.

What the demo and the benchmarks compare time and memory with; for exactness, the oracle
(:func:`flash.reference.dense_attention`) is the source of truth.
"""

from __future__ import annotations

import torch


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` of (batch, seqlen, heads, head_dim) tensors in their own precision
    (causal: top-left aligned, the square case the demo and benchmarks use)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
