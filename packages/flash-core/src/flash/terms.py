"""The score terms and extra masks of a call, evaluated in torch (the reference backend and the oracle).

Order, shared by every backend: with ``s = scale * q . k``,

1. softcap: ``s = softcap * tanh(s / softcap)``;
2. ALiBi: ``s -= slope[b, h] * |i + off - j|`` (``off = len_k - len_q``, flash-attn's definition);
3. an additive (float) ``attn_mask``: ``s += attn_mask[b, h, i, j]``;
4. ``score_mod``: ``s = score_mod(s, b, h, i, j)``;

then key ``j`` is hidden from query ``i`` if causal/window hide it, or a boolean ``attn_mask``
is False there, or ``mask_mod(b, h, i, j)`` is False, or the block mask's own mask is False.
``i`` and ``j`` are positions inside the sequence; ``b`` the sequence, ``h`` the query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flash.backend import MaskTensors
from flash.spec import AttentionSpec


@dataclass(frozen=True)
class Region:
    """Index tensors of a block of scores, each broadcastable to (batch, heads_q, rows, cols)."""

    b: torch.Tensor  # (B, 1, 1, 1) sequence indices
    h: torch.Tensor  # (1, H, 1, 1) query heads
    i: torch.Tensor  # (1, 1, R, 1) query positions
    j: torch.Tensor  # (1, 1, 1, C) key positions
    len_q: int
    len_k: int


def region(
    batch_ids: list[int], heads: int, rows: tuple[int, int], cols: tuple[int, int], len_q: int, len_k: int, device
) -> Region:
    """The region of rows ``[i0, i1)`` and keys ``[j0, j1)`` of the sequences ``batch_ids``."""
    return Region(
        torch.tensor(batch_ids, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        torch.arange(*rows, device=device).view(1, 1, -1, 1),
        torch.arange(*cols, device=device).view(1, 1, 1, -1),
        len_q,
        len_k,
    )


def _mask_block(mask: torch.Tensor, r: Region, varlen_batch: bool) -> torch.Tensor:
    """The attn_mask entries of ``r`` (broadcast axes stay size 1)."""
    b = r.b.flatten() if mask.shape[0] > 1 and not varlen_batch else slice(None)
    i = r.i.flatten() if mask.shape[2] > 1 else slice(None)
    j = r.j.flatten() if mask.shape[3] > 1 else slice(None)
    return mask[b][:, :, i][:, :, :, j]


def _same_document(ids: torch.Tensor, r: Region) -> torch.Tensor:
    """True where query and key of ``r`` share a document id (``ids`` (B|1, S)), shaped (B|1, 1, R, C)."""
    rows = ids[r.b.flatten()] if ids.shape[0] > 1 else ids
    return (rows[:, r.i.flatten(), None] == rows[:, None, r.j.flatten()])[:, None]


class Terms:
    """The call's terms: ``add`` rewrites scores (steps 1-4 above but softcap), ``seen`` gives the extra masks."""

    def __init__(self, spec: AttentionSpec, tensors: MaskTensors | None) -> None:
        self.spec = spec
        self.tensors = tensors or MaskTensors()

    def add(self, s: torch.Tensor, r: Region) -> torch.Tensor:
        """Scores after softcap, shaped (B, H, R, C), with ALiBi, the additive mask and score_mod applied."""
        spec, t = self.spec, self.tensors
        if t.alibi_slopes is not None:
            slopes = t.alibi_slopes.to(s.dtype)
            slope = (
                slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes[r.b.flatten()].view(-1, slopes.shape[1], 1, 1)
            )
            s = s - slope * (r.i + (r.len_k - r.len_q) - r.j).abs().to(s.dtype)
        if spec.mask is not None and spec.mask.kind == "bias":
            assert t.attn_mask is not None
            s = s + _mask_block(t.attn_mask, r, False).to(s.dtype)
        if spec.score_mod is not None:
            s = spec.score_mod(s, r.b, r.h, r.i, r.j).to(s.dtype)
        return s

    def score_mod_derivative(self, s: torch.Tensor, r: Region) -> torch.Tensor:
        """``d score_mod / d score`` at the scores before it: the caller's ``score_mod_grad``, or autograd."""
        spec = self.spec
        assert spec.score_mod is not None
        if spec.score_mod_grad is not None:
            return torch.broadcast_to(spec.score_mod_grad(s, r.b, r.h, r.i, r.j), s.shape).to(s.dtype)
        with torch.enable_grad():
            x = s.detach().requires_grad_()
            (grad,) = torch.autograd.grad(spec.score_mod(x, r.b, r.h, r.i, r.j).sum(), x, allow_unused=True)
        return torch.zeros_like(s) if grad is None else grad

    def seen(self, r: Region) -> torch.Tensor | None:
        """True where the extra masks (boolean attn_mask, mask_mod, block mask) let a query see a key.

        None when the call has no such mask.
        """
        spec, t = self.spec, self.tensors
        masks = []
        if spec.mask is not None and spec.mask.kind == "bool":
            assert t.attn_mask is not None
            masks.append(_mask_block(t.attn_mask, r, False))
        block = t.block_mask
        if block is not None and block.dense is not None:
            masks.append(_mask_block(block.dense, r, False))
        if block is not None and block.document_ids is not None:
            masks.append(_same_document(block.document_ids, r))
        fns = [spec.mask_mod, block.mask_mod if block is not None else None]
        masks += [fn(r.b, r.h, r.i, r.j).to(torch.bool) for fn in fns if fn is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out
