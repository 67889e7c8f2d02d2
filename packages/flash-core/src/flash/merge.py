"""Exact merging of partial attention results by their log-sum-exp.

Attention of a query row over a key set split into parts ``K = K_1 ∪ ... ∪ K_n`` (disjoint) is
recovered exactly from the parts' outputs and LSEs::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

This is what split-KV decoding and ring attention (:mod:`flash.distributed`) build on. A row
that sees no key in any part (every ``lse_i = -inf``) gets output 0 and LSE -inf, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from flash.errors import InvalidInputError

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LSE_DTYPES = (torch.float32, torch.float64)


def combine(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The merge itself, without validation: the one definition every merge in flash uses.

    ``lses[i]`` has shape ``outs[i].shape[:-1]`` (the LSE of each output row, already aligned).
    Computes in float64 if any input is float64, else float32, and returns ``(out, lse)`` in that
    dtype. Built from differentiable torch ops; NaN-free for rows whose every part is -inf.
    """
    compute = torch.float64 if any(t.dtype == torch.float64 for t in (*outs, *lses)) else torch.float32
    stacked = torch.stack([lse.to(compute) for lse in lses])  # (parts, ...)
    # Shifting by the max only keeps exp() in range; lse does not depend on it, so no gradient flows there.
    top = stacked.amax(dim=0).detach()
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weights = torch.exp(stacked - top)  # 0 for a part the row does not see
    total = weights.sum(dim=0)
    empty = total == 0  # every part -inf: output 0, LSE -inf
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), torch.log(safe_total) + top)
    scale = (weights / safe_total).unsqueeze(-1)  # exp(lse_i - lse), 0 for rows that see nothing
    out = scale[0] * outs[0].to(compute)
    for index in range(1, len(outs)):  # a fixed order: the result is bit-identical run to run
        out = out + scale[index] * outs[index].to(compute)
    return out, lse


def _as_parts(name: str, value: object) -> list[Tensor]:
    if isinstance(value, Tensor):  # a stacked tensor: its first dimension indexes the parts
        if value.dim() == 0:
            raise InvalidInputError(name, "a sequence of tensors, or a tensor stacked along dim 0", "a 0-d tensor")
        return list(value.unbind(0))
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInputError(name, "a non-empty list or tuple of tensors", type(value).__name__)
    for index, part in enumerate(value):
        if not isinstance(part, Tensor):
            raise InvalidInputError(f"{name}[{index}]", "a torch.Tensor", type(part).__name__)
    return list(value)


def _expected_lse_shape(out: Tensor, layout: str) -> tuple[int, ...]:
    if layout == "bhsd":  # (..., heads, seqlen, d) -> (..., heads, seqlen)
        return tuple(out.shape[:-1])
    # (..., seqlen, heads, d) -> (..., heads, seqlen); varlen (total, heads, d) -> (heads, total)
    return (*out.shape[:-3], out.shape[-2], out.shape[-3])


def merge_states(
    outs: Sequence[Tensor] | Tensor,
    lses: Sequence[Tensor] | Tensor,
    *,
    layout: Literal["bshd", "bhsd"] = "bshd",
) -> tuple[Tensor, Tensor]:
    """Merge partial attention results over disjoint key sets into the exact result.

    Args:
        outs: the parts' outputs, all of one shape, dtype and device: (..., seqlen, heads, head_dim)
            with ``layout="bshd"`` (what :func:`flash.attention` returns, including a packed
            varlen (total, heads, head_dim)), or (..., heads, seqlen, head_dim) with ``"bhsd"``.
            A list or tuple, or one tensor stacked along a new first dimension.
        lses: the parts' log-sum-exps as :func:`flash.attention` returns them with
            ``return_lse=True``: (..., heads, seqlen) in both layouts ((heads, total) for varlen);
            float32 or float64; -inf for a row that saw no key of that part.
        layout: how ``outs`` are laid out.

    Returns:
        ``(out, lse)``: ``out = sum_i exp(lse_i - lse) out_i`` in the dtype of ``outs`` and
        ``lse = logsumexp_i(lse_i)`` in float32 (float64 if any input is float64). Rows where every
        part is -inf get output 0 and LSE -inf. The merge is computed in float32 (float64) and is
        differentiable in ``outs`` and ``lses``.

    Raises:
        InvalidInputError: naming the argument, for mismatched counts, shapes, dtypes or devices.
    """
    if layout not in ("bshd", "bhsd"):
        raise InvalidInputError("layout", "'bshd' or 'bhsd'", repr(layout))
    out_parts, lse_parts = _as_parts("outs", outs), _as_parts("lses", lses)
    if len(lse_parts) != len(out_parts):
        raise InvalidInputError("lses", f"{len(out_parts)} tensors (one per output)", f"{len(lse_parts)}")
    first = out_parts[0]
    min_dim = 3 if layout == "bshd" else 2
    if first.dim() < min_dim:
        raise InvalidInputError("outs", f"tensors of at least {min_dim} dimensions", f"shape {tuple(first.shape)}")
    if first.dtype not in _OUT_DTYPES:
        raise InvalidInputError("outs", "float16, bfloat16, float32 or float64 tensors", str(first.dtype))
    lse_shape = _expected_lse_shape(first, layout)
    for index, (out, lse) in enumerate(zip(out_parts, lse_parts)):
        if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
            raise InvalidInputError(
                f"outs[{index}]",
                f"shape {tuple(first.shape)}, dtype {first.dtype}, device {first.device} (same as outs[0])",
                f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}",
            )
        if tuple(lse.shape) != lse_shape:
            raise InvalidInputError(f"lses[{index}]", f"shape {lse_shape} for {layout} outputs", f"{tuple(lse.shape)}")
        if lse.dtype not in _LSE_DTYPES:
            raise InvalidInputError(f"lses[{index}]", "dtype float32 or float64", str(lse.dtype))
        if lse.device != first.device:
            raise InvalidInputError(f"lses[{index}]", f"device {first.device} (same as outs)", str(lse.device))
    # Align each LSE with its output's rows: (..., heads, seqlen) -> (..., seqlen, heads) for bshd.
    aligned = lse_parts if layout == "bhsd" else [lse.transpose(-1, -2) for lse in lse_parts]
    out, lse = combine(out_parts, aligned)
    lse = lse if layout == "bhsd" else lse.transpose(-1, -2)
    return out.to(first.dtype), lse.contiguous()
