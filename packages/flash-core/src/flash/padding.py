"""Between padded batches and the packed (variable-length) layout of :func:`flash.attention`.

A padded batch is ``(batch, seqlen, ...)`` with a 2-D mask saying which tokens are real; the
packed layout keeps only those tokens, ``(total, ...)``, with ``cu_seqlens`` saying where each
sequence starts. :func:`unpad` goes one way (:func:`unpad_indices` and :func:`select_tokens` do it
in two steps, for tensors that share a mask), :func:`pad` the other, and
:func:`cu_seqlens_from_position_ids` reads the sequence boundaries of an already packed batch from
its position ids. None of them needs transformers.

Host synchronisation: the number of real tokens decides the size of the packed tensor, so
:func:`unpad_indices` (and :func:`unpad`) and :func:`cu_seqlens_from_position_ids` wait for the
device once to learn it (``torch.nonzero``), and once more to read ``max_seqlen`` unless the caller
passes it. :func:`select_tokens` and :func:`pad` never wait.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flash.errors import InvalidInputError

__all__ = ["UnpadIndices", "Unpadded", "cu_seqlens_from_position_ids", "pad", "select_tokens", "unpad", "unpad_indices"]


class UnpadIndices(NamedTuple):
    """Where the real tokens of a padded batch are (see :func:`unpad_indices`)."""

    indices: Tensor  #: int64 (total,): positions of the real tokens in the flattened (batch * seqlen) batch
    cu_seqlens: Tensor  #: int32 (batch + 1,): offsets of each sequence in the packed tensor
    max_seqlen: int  #: the longest sequence


class Unpadded(NamedTuple):
    """A packed tensor and what :func:`pad` and :func:`flash.attention` need to use it."""

    values: Tensor  #: (total, ...): the real tokens, sequence after sequence
    indices: Tensor  #: int64 (total,): their positions in the flattened (batch * seqlen) batch
    cu_seqlens: Tensor  #: int32 (batch + 1,)
    max_seqlen: int


def _check_mask(attention_mask: object) -> Tensor:
    if not isinstance(attention_mask, Tensor):
        raise InvalidInputError("attention_mask", "a torch.Tensor", type(attention_mask).__name__)
    if attention_mask.dim() != 2:
        raise InvalidInputError("attention_mask", "a 2-D (batch, seqlen) mask", f"shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise InvalidInputError("attention_mask", "a bool or integer mask (1 = real token)", str(attention_mask.dtype))
    return attention_mask


def _check_max_seqlen(max_seqlen: object) -> None:
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise InvalidInputError("max_seqlen", "None or a non-negative int", repr(max_seqlen))


def _longest(lengths: Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        return max_seqlen
    return int(lengths.max().item()) if lengths.numel() else 0  # the documented host sync


def unpad_indices(attention_mask: Tensor, *, max_seqlen: int | None = None) -> UnpadIndices:
    """Locate the real tokens of a padded batch.

    Args:
        attention_mask: (batch, seqlen), bool or integer; nonzero marks a real token. Real tokens
            need not be contiguous: each sequence is its real tokens, in order.
        max_seqlen: the longest sequence, if the caller knows it (saves a host sync).

    Returns:
        ``(indices, cu_seqlens, max_seqlen)``. Compute them once and pack any number of tensors
        that share the mask with :func:`select_tokens`.
    """
    mask = _check_mask(attention_mask)
    _check_max_seqlen(max_seqlen)
    keep = mask != 0
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(keep.flatten()).flatten()  # host sync: the count is data-dependent
    return UnpadIndices(indices, cu_seqlens, _longest(lengths, max_seqlen))


def unpad(x: Tensor, attention_mask: Tensor, *, max_seqlen: int | None = None) -> Unpadded:
    """Pack the real tokens of a padded batch: ``(batch, seqlen, ...)`` to ``(total, ...)``.

    >>> x = torch.arange(6.0).reshape(2, 3, 1)
    >>> packed = flash.padding.unpad(x, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    >>> packed.values.flatten().tolist(), packed.cu_seqlens.tolist(), packed.max_seqlen
    ([0.0, 1.0, 3.0, 4.0, 5.0], [0, 2, 5], 3)

    Differentiable in ``x``. See :func:`unpad_indices` for the mask and the host syncs.
    """
    if not isinstance(x, Tensor):
        raise InvalidInputError("x", "a torch.Tensor", type(x).__name__)
    mask = _check_mask(attention_mask)
    if x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise InvalidInputError(
            "x", f"shape (batch, seqlen, ...) with (batch, seqlen) = {tuple(mask.shape)}", f"shape {tuple(x.shape)}"
        )
    if mask.device != x.device:
        raise InvalidInputError("attention_mask", f"device {x.device} (same as x)", str(mask.device))
    found = unpad_indices(mask, max_seqlen=max_seqlen)
    return Unpadded(select_tokens(x, found.indices), *found)


def select_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """The tokens ``indices`` (from :func:`unpad_indices`) of a ``(batch, seqlen, ...)`` tensor, as
    ``(total, ...)``. Reads only those tokens, also from a strided view (a transposed tensor, a
    KV cache), where ``x.flatten(0, 1)[indices]`` would first copy all of ``x``. Differentiable in ``x``."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = f"{x.dim()}-D tensor" if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError("x", "a tensor (batch, seqlen, ...)", got)
    seqlen = x.shape[1]
    return x[indices // seqlen, indices % seqlen]


def pad(x: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Scatter packed tokens back into a zero-filled ``(batch, seqlen, ...)`` batch (inverse of :func:`unpad`).

    >>> x = torch.arange(6.0).reshape(2, 3, 1)
    >>> packed = flash.padding.unpad(x, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    >>> flash.padding.pad(packed.values, packed.indices, 2, 3).flatten().tolist()
    [0.0, 1.0, 0.0, 3.0, 4.0, 5.0]

    Differentiable in ``x``; no host sync.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = "0-D tensor" if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError("x", "a tensor (total, ...)", got)
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError("indices", "a 1-D int64 or int32 tensor (from unpad)", repr(indices)[:80])
    if indices.shape[0] != x.shape[0]:
        raise InvalidInputError("indices", f"{x.shape[0]} entries, one per row of x", f"{indices.shape[0]}")
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(name, "a non-negative int", repr(value))
    out = x.new_zeros((batch * seqlen, *x.shape[1:]))
    return out.index_copy(0, indices.to(torch.int64), x).unflatten(0, (batch, seqlen))


def cu_seqlens_from_position_ids(position_ids: Tensor, *, max_seqlen: int | None = None) -> tuple[Tensor, int]:
    """Sequence boundaries of a packed batch, read from its position ids.

    A sequence starts at the beginning of each row and wherever a position is not its
    predecessor's plus one (as transformers reads packed position ids), so ``[[0, 1, 2, 0, 1]]`` is
    two sequences of 3 and 2 tokens. Tokens are taken row after row, so the result indexes
    ``x.flatten(0, 1)`` of a ``(batch, seqlen, ...)`` tensor.

    >>> flash.padding.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    (tensor([ 0,  3,  5, 10], dtype=torch.int32), 5)

    Args:
        position_ids: (batch, seqlen) or (seqlen,) integer positions.
        max_seqlen: the longest sequence, if known (saves a host sync).

    Returns:
        ``(cu_seqlens, max_seqlen)``: int32 offsets (sequences + 1,) on the device of ``position_ids``.
    """
    if not isinstance(position_ids, Tensor):
        raise InvalidInputError("position_ids", "a torch.Tensor", type(position_ids).__name__)
    if position_ids.dim() not in (1, 2) or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        got = f"{position_ids.dtype} tensor of shape {tuple(position_ids.shape)}"
        raise InvalidInputError("position_ids", "a (batch, seqlen) or (seqlen,) integer tensor", got)
    _check_max_seqlen(max_seqlen)
    rows = position_ids.reshape(-1, position_ids.shape[-1]) if position_ids.numel() else position_ids.reshape(0, 0)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    total = rows.numel()
    begin = torch.nonzero(starts.flatten()).flatten().to(torch.int32)  # host sync: the count is data-dependent
    cu_seqlens = torch.cat([begin, begin.new_full((1,), total)])
    return cu_seqlens, _longest(cu_seqlens.diff(), max_seqlen)
