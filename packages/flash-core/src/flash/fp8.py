"""Quantising inputs for fp8 attention: a tensor and the descale factor that undoes its scaling.

:func:`flash.attention` takes fp8 ``q``, ``k``, ``v`` with float32 descale factors: the values it
computes with are ``q * q_descale`` and so on. :func:`quantize` makes such a pair from a bf16, fp16
or float32 tensor, one factor per tensor or one per (batch, head), so that trying fp8 is one line:

>>> import torch, flash
>>> q, k, v = (torch.randn(2, 64, 4, 32) for _ in range(3))
>>> (q8, qd), (k8, kd), (v8, vd) = (flash.fp8.quantize(t) for t in (q, k, v))
>>> q8.dtype, tuple(qd.shape)
(torch.float8_e4m3fn, (2, 4))
>>> out = flash.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
>>> out.dtype  # fp8 attention returns bf16 (out_dtype=torch.float16 asks for fp16)
torch.bfloat16

Each (batch, head) slice is scaled so that its largest magnitude lands on the format's largest
finite value: per-head factors keep a head with outliers from costing every other head its
precision.

:func:`quantize_qkv` does all three at once and returns the keyword arguments of
:func:`flash.attention`; with ``hadamard=True`` it first applies FlashAttention-3's *incoherent
processing*: ``q`` and ``k`` are multiplied along head_dim by the same orthogonal Hadamard matrix
``H`` (:func:`hadamard_transform`). Since ``(q H)(k H)^T = q H H^T k^T = q k^T``, attention is
unchanged, but an outlier of one channel is spread over all of them, so the amax that sets the
scale shrinks and every other value keeps more of its precision. ``v`` is not rotated (that would
rotate the output).

>>> out = flash.attention(**flash.fp8.quantize_qkv(q, k, v, hadamard=True), causal=True)
>>> out.shape, out.dtype
(torch.Size([2, 64, 4, 32]), torch.bfloat16)
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch

from flash.errors import InvalidInputError
from flash.spec import FP8_DTYPES

__all__ = ["QuantizedQKV", "hadamard_transform", "quantize", "quantize_qkv"]

#: Smallest amax a slice is scaled by: an all-zero slice keeps descale 1 instead of dividing by 0.
_TINY = 2.0**-120

Granularity = Literal["head", "tensor"]
Layout = Literal["bshd", "bhsd"]


class QuantizedQKV(TypedDict):
    """What :func:`quantize_qkv` returns: keyword arguments of :func:`flash.attention`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor


def quantize(
    t: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: Granularity = "head",
    layout: Layout = "bshd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_fp8, descale)`` with ``t ~= t_fp8 * descale`` (descale float32).

    Args:
        t: a (batch, seqlen, heads, head_dim) tensor ((batch, heads, seqlen, head_dim) with
            ``layout="bhsd"``) of a floating dtype; ``granularity="tensor"`` also takes a
            variable-length (total, heads, head_dim) tensor.
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        granularity: ``"head"``: one factor per (batch, head), shape (batch, heads); ``"tensor"``:
            one factor, shape ().
        layout: where the head axis is, as in :func:`flash.attention`.
    """
    _check_options(dtype, granularity, layout)
    return _quantize("t", t, dtype, granularity, layout)


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    hadamard: bool = False,
    dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: Granularity = "head",
    layout: Layout = "bshd",
) -> QuantizedQKV:
    """``q``, ``k``, ``v`` in fp8 with their descale factors, as keyword arguments of :func:`flash.attention`::

        out = flash.attention(**flash.fp8.quantize_qkv(q, k, v, hadamard=True), causal=True)

    (with ``layout="bhsd"`` pass the same layout to :func:`flash.attention`).

    Args:
        q, k, v: as for :func:`quantize` (and :func:`flash.attention`), any floating dtype but fp8.
        hadamard: rotate ``q`` and ``k`` by :func:`hadamard_transform` before quantising
            (incoherent processing: same attention, lower fp8 error when channels have outliers).
            ``v`` is never rotated. head_dim must be even (see :func:`hadamard_transform`).
        dtype, granularity, layout: as for :func:`quantize`, applied to all three.
    """
    _check_options(dtype, granularity, layout)
    if not isinstance(hadamard, bool):
        raise InvalidInputError("hadamard", "a bool", repr(hadamard))
    if hadamard:
        for name, t in (("q", q), ("k", k)):
            _check_source(name, t)
            _hadamard_block(name, t.shape[-1] if t.dim() else 0)
        if k.shape[-1] != q.shape[-1]:
            raise InvalidInputError("k", f"head_dim {q.shape[-1]} (same as q)", f"head_dim {k.shape[-1]}")
        q, k = _rotate(q), _rotate(k)
    (q8, qd), (k8, kd), (v8, vd) = (
        _quantize(name, t, dtype, granularity, layout) for name, t in (("q", q), ("k", k), ("v", v))
    )
    return QuantizedQKV(q=q8, k=k8, v=v8, q_descale=qd, k_descale=kd, v_descale=vd)


def hadamard_transform(t: torch.Tensor) -> torch.Tensor:
    """``t`` times the orthogonal Hadamard matrix along its last axis (head_dim), in float32.

    The matrix is the normalised Sylvester Hadamard matrix ``H_n / sqrt(n)`` of the largest power of
    two ``n`` that divides head_dim, repeated down the diagonal (head_dim 128: one 128 x 128 block;
    96: three of 32). It is symmetric and its own inverse, so applying it twice gives ``t`` back. A
    fast Walsh-Hadamard transform: log2(n) butterfly steps of O(head_dim) per row, no matrix is
    formed. An odd head_dim has no such block (the rotation would be the identity) and is refused.
    """
    _check_source("t", t)
    _hadamard_block("t", t.shape[-1] if t.dim() else 0)
    return _rotate(t)


def _rotate(t: torch.Tensor) -> torch.Tensor:
    d = t.shape[-1]
    n = d & -d  # the largest power of two dividing d
    x = t.float().unflatten(-1, (d // n, n))
    half = 1
    while half < n:  # one butterfly step: pairs (a, b) half apart become (a + b, a - b)
        pairs = x.unflatten(-1, (n // (2 * half), 2, half))
        a, b = pairs.unbind(-2)
        x = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        half *= 2
    return (x * n**-0.5).flatten(-2)


def _hadamard_block(name: str, head_dim: int) -> int:
    block = head_dim & -head_dim
    if block < 2:
        raise InvalidInputError(
            name, "an even head_dim for the Hadamard rotation (blocks of the largest power of two dividing it)",
            f"head_dim {head_dim}",
        )  # fmt: skip
    return block


def _check_options(dtype: object, granularity: object, layout: object) -> None:
    if dtype not in FP8_DTYPES:
        raise InvalidInputError("dtype", "torch.float8_e4m3fn or torch.float8_e5m2", str(dtype))
    if granularity not in ("head", "tensor"):
        raise InvalidInputError("granularity", '"head" or "tensor"', repr(granularity))
    if layout not in ("bshd", "bhsd"):
        raise InvalidInputError("layout", '"bshd" or "bhsd"', repr(layout))


def _check_source(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in FP8_DTYPES:
        raise InvalidInputError(name, "a floating-point tensor that is not fp8 already", _describe(t))


def _quantize(
    name: str, t: torch.Tensor, dtype: torch.dtype, granularity: Granularity, layout: Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_source(name, t)
    if granularity == "head" and t.dim() != 4:
        raise InvalidInputError(name, "4 dimensions for per-head factors (or granularity='tensor')", f"{t.dim()}")
    wide = t.float()
    largest = torch.finfo(dtype).max
    if granularity == "tensor":
        amax = wide.abs().amax().clamp_min(_TINY)
        descale = amax / largest
        return (wide / descale).to(dtype), descale
    by_head = wide if layout == "bhsd" else wide.transpose(1, 2)  # (batch, heads, seqlen, head_dim)
    amax = by_head.abs().amax(dim=(2, 3)).clamp_min(_TINY)
    descale = amax / largest  # (batch, heads)
    scale = descale[:, :, None, None] if layout == "bhsd" else descale[:, None, :, None]
    return (wide / scale).to(dtype), descale.contiguous()


def _describe(t: object) -> str:
    return f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
