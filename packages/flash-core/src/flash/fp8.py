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
>>> out.dtype  # fp8 attention returns bf16
torch.bfloat16

Each (batch, head) slice is scaled so that its largest magnitude lands on the format's largest
finite value: per-head factors keep a head with outliers from costing every other head its
precision.
"""

from __future__ import annotations

from typing import Literal

import torch

from flash.errors import InvalidInputError
from flash.spec import FP8_DTYPES

__all__ = ["quantize"]

#: Smallest amax a slice is scaled by: an all-zero slice keeps descale 1 instead of dividing by 0.
_TINY = 2.0**-120


def quantize(
    t: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: Literal["head", "tensor"] = "head",
    layout: Literal["bshd", "bhsd"] = "bshd",
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
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in FP8_DTYPES:
        raise InvalidInputError("t", "a floating-point tensor that is not fp8 already", _describe(t))
    if dtype not in FP8_DTYPES:
        raise InvalidInputError("dtype", "torch.float8_e4m3fn or torch.float8_e5m2", str(dtype))
    if granularity not in ("head", "tensor"):
        raise InvalidInputError("granularity", '"head" or "tensor"', repr(granularity))
    if layout not in ("bshd", "bhsd"):
        raise InvalidInputError("layout", '"bshd" or "bhsd"', repr(layout))
    if granularity == "head" and t.dim() != 4:
        raise InvalidInputError("t", "4 dimensions for per-head factors (or granularity='tensor')", f"{t.dim()}")
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
