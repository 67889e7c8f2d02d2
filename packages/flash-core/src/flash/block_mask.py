"""Block-sparse masks: which key blocks each query block visits, built once and reused.

A mask splits the score matrix into blocks of ``block_size = (rows, cols)``. Each block is
*hidden* (no query of the block sees any key of it: never loaded, never computed), *full*
(every query sees every key: computed without a mask) or *partial* (computed, then masked
element by element). A :class:`BlockMask` stores, for every (sequence, head, query block),
the lists of its partial and full key blocks, and the transposed lists for the backward's
key-stationary pass, so a kernel walks only the blocks that cost work.

It is built from the mask it summarises (:meth:`BlockMask.from_mask_mod`,
:meth:`BlockMask.from_dense`, :meth:`BlockMask.from_document_ids`) and keeps that mask for the
partial blocks; build it once per shape and pass it to every call and layer that shares the mask.
A document mask keeps only its document ids (one int per token): a partial block compares a few
ids instead of reading a dense (Sq, Sk) mask. :func:`block_states` is the
summary itself (one torch reduction), which the ``triton`` backend also runs per call for a
dense boolean ``attn_mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from flash.errors import InvalidInputError

HIDDEN, PARTIAL, FULL = 0, 1, 2
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _int_pair(value: object) -> bool:
    """True for a tuple or list of two ints (bools excluded)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return False
    return all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _check_block_size(block_size: object) -> tuple[int, int]:
    pair = cast("tuple[int, int]", block_size)
    if not _int_pair(block_size) or not all(x >= 16 and x & (x - 1) == 0 for x in pair):
        raise InvalidInputError("block_size", "a pair of powers of two >= 16 (rows, cols)", repr(block_size))
    return pair


def block_states(mask: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int]) -> torch.Tensor:
    """int8 (B, H, query blocks, key blocks) of HIDDEN/PARTIAL/FULL for a boolean (B, H, Sq|1, Sk|1) mask.

    A query axis of size 1 (a key-padding mask, the same for every query) stays one block row.
    Blocks that reach past the end of the sequence on either axis are never FULL: the kernels
    mask their tails (and the backward walks query blocks as the forward walks key blocks).
    """
    tiles = _blocks(mask, seqlen_q, seqlen_k, block_size, past_ends=0)
    seen = tiles.amax(dim=(3, 5)) > 0
    full = tiles.amin(dim=(3, 5)) > 0
    return torch.where(full, FULL, torch.where(seen, PARTIAL, HIDDEN)).to(torch.int8)


def partial_inside(
    mask: torch.Tensor, states: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int]
) -> torch.Tensor:
    """bool (0-dim): whether some block of ``mask`` (as :func:`block_states` takes it; ``states``, what it
    returned) is partial inside the sequences, i.e. hides some of its scores within them while showing
    others. A block that is PARTIAL only because it reaches past an end is not: a kernel masks that tail
    anyway (:attr:`BlockMaskInfo.partial`)."""
    full_inside = _blocks(mask, seqlen_q, seqlen_k, block_size, past_ends=1).amin(dim=(3, 5)) > 0
    return ((states != HIDDEN) & ~full_inside).any()


def _blocks(
    mask: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int], past_ends: int
) -> torch.Tensor:
    """uint8 (B, H, nQ, rows, nK, bn): ``mask`` cut into blocks, the scores past the sequences' ends ``past_ends``."""
    bm, bn = block_size
    m = mask.expand(*mask.shape[:3], seqlen_k)
    rows = 1 if m.shape[2] == 1 else seqlen_q
    n_q, n_k = -(-rows // bm) if rows > 1 else 1, -(-seqlen_k // bn)
    pad_q = n_q * bm - rows if rows > 1 else 0
    padded = torch.nn.functional.pad(m.to(torch.uint8), (0, n_k * bn - seqlen_k, 0, pad_q), value=past_ends)
    return padded.unflatten(3, (n_k, bn)).unflatten(2, (n_q, -1))


def _lists(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (..., 2) int32, indices (..., 2, n) int32): the partial, then the full blocks of each row, ascending."""
    kinds = torch.stack((states == PARTIAL, states == FULL), dim=-2)  # (..., 2, n)
    counts = kinds.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~kinds).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts.contiguous(), order.contiguous()


@dataclass(frozen=True)
class BlockLists:
    """Per-row block lists in the layout the kernels read (see :func:`block_lists`)."""

    kv_counts: torch.Tensor  # (B, H, nQ|1, 2): partial and full key blocks of each query block
    kv_indices: torch.Tensor  # (B, H, nQ|1, 2, nK)
    q_counts: torch.Tensor  # (B, H, nK, 2): partial and full query blocks of each key block
    q_indices: torch.Tensor  # (B, H, nK, 2, nQ)


def block_lists(states: torch.Tensor, seqlen_q: int, block_rows: int) -> BlockLists:
    """The kernels' lists of ``states`` (whose rows may be one broadcast row) for ``seqlen_q`` queries."""
    kv_counts, kv_indices = _lists(states)
    n_q = -(-seqlen_q // block_rows)
    transposed = states.expand(*states.shape[:2], n_q, states.shape[3]).transpose(2, 3).clone()
    if seqlen_q % block_rows:  # a broadcast row says nothing of the tail query block: it is partial at most
        transposed[..., -1] = transposed[..., -1].clamp(max=PARTIAL)
    q_counts, q_indices = _lists(transposed)
    return BlockLists(kv_counts, kv_indices, q_counts, q_indices)


@dataclass(frozen=True)
class BlockMaskInfo:
    """What a spec records of a block mask: sizes and the mask's identity, never its values."""

    batch: int  # 1: the same for every sequence
    heads: int  # 1: the same for every head
    seqlen_q: int
    seqlen_k: int
    block_size: tuple[int, int]
    mask_mod: MaskMod | None
    dense: bool
    density: float
    documents: bool = False  # partial blocks compare document ids (see BlockMask.from_document_ids)
    intervals: bool = False  # every query sees one interval of keys (see BlockMask.key_intervals)
    #: Some visited block is partial inside the sequences (False: every visited block is full but for the
    #: part past a sequence's end, which kernels mask anyway; they walk the block lists unmasked).
    partial: bool = True

    @property
    def feature(self) -> str:
        """The spec feature this mask is (:data:`flash.backend.FEATURES`): "key_intervals" where every query
        sees one interval of keys, else "block_sparse" where no visited block is partial, else "block_mask"."""
        if self.intervals:
            return "key_intervals"
        return "block_mask" if self.partial else "block_sparse"


class BlockMask:
    """Which (query block, key block) tiles a mask hides, leaves partial or leaves fully visible.

    Build one with :meth:`from_mask_mod` or :meth:`from_dense` and pass it as
    ``flash.attention(..., block_mask=...)``; every query sees a key iff the mask it was built
    from says so (its blocks only decide what is skipped). ``density`` is the fraction of blocks
    visited.
    """

    def __init__(
        self,
        states: torch.Tensor,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int],
        *,
        mask_mod: MaskMod | None = None,
        dense: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        key_intervals: torch.Tensor | None = None,
        partial: torch.Tensor | None = None,
    ) -> None:
        self.block_size = block_size
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k
        self.mask_mod, self.dense = mask_mod, dense
        self.document_ids = document_ids  # int32 (B|1, S): query i sees key j only within one document
        #: int32 (B|1, 2, Sq) or None: where every query sees one run of keys, query i sees exactly the keys
        #: [key_intervals[:, 0, i], key_intervals[:, 1, i]), and neither end moves left as i grows (see
        #: ``intervals_of``). Kernels then test one interval per score instead of the mask, and a
        #: kernel that walks a query tile's keys from its first row's start to its last row's end needs
        #: no block lists.
        self.key_intervals = key_intervals
        self.states = states
        self.lists = block_lists(states, seqlen_q, block_size[0])
        # partial: :func:`partial_inside` of the mask (None: every PARTIAL block counts); one host sync for all
        counted = (states == PARTIAL).sum()
        inside = counted > 0 if partial is None else partial.to(states.device)
        visited, partial_blocks, ragged = torch.stack(((states != HIDDEN).sum(), counted, inside.long())).tolist()
        self.density = float(visited) / max(1, states.numel())
        #: The fraction of visited blocks that are partial (masked element by element).
        self.partial_share = float(partial_blocks) / max(1, visited)
        self.info = BlockMaskInfo(
            batch=states.shape[0],
            heads=states.shape[1],
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            block_size=block_size,
            mask_mod=mask_mod,
            dense=dense is not None,
            density=round(self.density, 4),
            documents=document_ids is not None,
            intervals=key_intervals is not None,
            partial=bool(ragged),
        )

    @property
    def device(self) -> torch.device:
        return self.states.device

    def __repr__(self) -> str:
        bm, bn = self.block_size
        return (
            f"BlockMask(batch={self.info.batch}, heads={self.info.heads}, seqlen={self.seqlen_q}x{self.seqlen_k}, "
            f"block_size=({bm}, {bn}), density={self.density:.1%})"
        )

    @classmethod
    def from_dense(cls, mask: torch.Tensor, *, block_size: tuple[int, int] = (128, 128)) -> BlockMask:
        """From a boolean mask (True: visible) of shape (B|1, H|1, Sq, Sk) or (Sq, Sk).

        The mask is kept (the kernels read it in partial blocks only).
        """
        block_size = _check_block_size(block_size)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 4):
            got = f"{type(mask).__name__}" if not isinstance(mask, torch.Tensor) else f"{mask.dtype} {mask.dim()}-D"
            raise InvalidInputError("mask", "a boolean tensor (Sq, Sk) or (B|1, H|1, Sq, Sk)", got)
        mask4 = mask if mask.dim() == 4 else mask[None, None]
        sq, sk = mask4.shape[2], mask4.shape[3]
        intervals = None
        if mask4.shape[1] == 1:  # one block row at a time, as from_mask_mod
            full = mask4.expand(-1, -1, sq, sk)
            intervals = intervals_of(torch.cat([row_runs(full[:, :, i0 : i0 + block_size[0]])
                                                for i0 in range(0, sq, block_size[0])], dim=-1))  # fmt: skip
        states = block_states(mask4, sq, sk, block_size)
        return cls(states, sq, sk, block_size, dense=mask4, key_intervals=intervals,
                   partial=partial_inside(mask4, states, sq, sk, block_size))  # fmt: skip

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskMod,
        *,
        batch: int | None,
        heads: int | None,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
        device: torch.device | str = "cpu",
    ) -> BlockMask:
        """From a mask function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (see :mod:`flash.mods`).

        ``batch``/``heads`` None: the mask does not depend on ``b``/``h`` (one summary serves all).
        The function is evaluated densely in torch once, one query block row at a time; the kernels
        call it again in partial blocks.
        """
        block_size = _check_block_size(block_size)
        for name, value in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(name, "a positive int", repr(value))
        if not callable(mask_mod):
            raise InvalidInputError("mask_mod", "a function (b, h, q_idx, kv_idx) -> bool", type(mask_mod).__name__)
        device = torch.device(device)
        nb, nh = batch or 1, heads or 1
        b = torch.arange(nb, device=device)[:, None, None, None]
        h = torch.arange(nh, device=device)[None, :, None, None]
        kv = torch.arange(seqlen_k, device=device)[None, None, None, :]
        bm = block_size[0]
        rows, runs, partial = [], [], torch.zeros((), dtype=torch.bool, device=device)
        for i0 in range(0, seqlen_q, bm):  # one block row at a time bounds the memory to (B, H, bm, Sk)
            q = torch.arange(i0, min(i0 + bm, seqlen_q), device=device)[None, None, :, None]
            seen = torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool)
            seen = seen.expand(nb, nh, q.shape[2], seqlen_k)
            rows.append(block_states(seen, q.shape[2], seqlen_k, block_size))
            runs.append(row_runs(seen))
            partial |= partial_inside(seen, rows[-1], q.shape[2], seqlen_k, block_size)
        states = torch.cat(rows, dim=2)
        intervals = intervals_of(torch.cat(runs, dim=-1)) if nh == 1 else None
        return cls(states, seqlen_q, seqlen_k, block_size, mask_mod=mask_mod, key_intervals=intervals, partial=partial)

    @classmethod
    def from_document_ids(
        cls, document_ids: torch.Tensor, *, causal: bool = True, block_size: tuple[int, int] = (128, 128)
    ) -> BlockMask:
        """Document masking of packed sequences: query ``i`` sees key ``j`` iff both belong to one document
        (``document_ids[i] == document_ids[j]``) and, with ``causal``, ``j <= i``.

        ``document_ids`` is an integer tensor (S,) or (B, S), one id per token (any ids; a document
        need not be contiguous); self-attention, so ``seqlen_q = seqlen_k = S``. Only the ids are
        kept: the kernels compare them in partial blocks, two small vector loads where a mask built
        with :meth:`from_dense` reads ``block_size`` bytes of a dense (S, S) mask per partial block.
        """
        block_size = _check_block_size(block_size)
        ids = document_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.shape[-1] < 1:
            got = type(ids).__name__ if not isinstance(ids, torch.Tensor) else f"shape {tuple(ids.shape)}"
            raise InvalidInputError("document_ids", "a tensor (S,) or (B, S) with S >= 1", got)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise InvalidInputError("document_ids", "an integer tensor (one id per token)", str(ids.dtype))
        if not isinstance(causal, bool):
            raise InvalidInputError("causal", "a bool", repr(causal))
        ids2 = (ids if ids.dim() == 2 else ids[None]).to(torch.int32).contiguous()
        seqlen, bm = ids2.shape[1], block_size[0]
        keys = torch.arange(seqlen, device=ids2.device)
        rows, partial = [], torch.zeros((), dtype=torch.bool, device=ids2.device)
        for i0 in range(0, seqlen, bm):  # one block row at a time bounds the memory to (B, bm, S)
            q = keys[i0 : i0 + bm]
            seen = ids2[:, q, None] == ids2[:, None, :]
            if causal:
                seen &= keys[None, None, :] <= q[None, :, None]
            rows.append(block_states(seen[:, None], q.shape[0], seqlen, block_size))
            partial |= partial_inside(seen[:, None], rows[-1], q.shape[0], seqlen, block_size)
        states = torch.cat(rows, dim=2)
        return cls(states, seqlen, seqlen, block_size, mask_mod=causal_mod if causal else None, document_ids=ids2,
                   key_intervals=document_runs(ids2, causal), partial=partial)  # fmt: skip


def document_runs(ids: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """int32 (B, 2, S): the first key and one past the last key each query sees, when each document of
    ``ids`` (int32 (B, S)) is one run of tokens; None when one is split (its keys are not an interval).

    Both ends never move left as the query grows (documents are runs in order): these are the mask's
    :attr:`BlockMask.key_intervals`. One host sync, as the block summary already needs.
    """
    seqlen = ids.shape[1]
    pos = torch.arange(seqlen, device=ids.device, dtype=torch.int32).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    runs = starts.sum(dim=1)
    distinct = torch.tensor([row.unique().numel() for row in ids], device=ids.device)
    if not bool((runs == distinct).all()):
        return None
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    last = torch.where(ends, pos + 1, seqlen).flip(1).cummin(dim=1).values.flip(1)
    stop = torch.minimum(last, pos + 1) if causal else last
    return torch.stack((first, stop), dim=1).to(torch.int32).contiguous()


def row_runs(seen: torch.Tensor) -> torch.Tensor:
    """int32 (B, H, 3, rows) of a boolean (B, H, rows, Sk) mask: each row's first visible key, one past
    its last, and how many it sees (a row that sees none: Sk, 0, 0)."""
    sk = seen.shape[-1]
    keys = torch.arange(sk, device=seen.device, dtype=torch.int32)
    lo = torch.where(seen, keys, sk).amin(dim=-1)
    hi = torch.where(seen, keys + 1, 0).amax(dim=-1)
    return torch.stack((lo, hi, seen.sum(dim=-1, dtype=torch.int32)), dim=2).to(torch.int32)


def intervals_of(runs: torch.Tensor) -> torch.Tensor | None:
    """int32 (B, 2, Sq) ``[lo, hi)`` per query from :func:`row_runs` of a mask the same for every head (H =
    1), when each query sees exactly the keys of its interval and neither end moves left as the query
    grows (a row that sees nothing counts as ``[0, 0)``); None otherwise. One host sync."""
    if runs.shape[1] != 1:
        return None
    lo, hi, count = runs[:, 0].unbind(dim=1)
    empty = count == 0
    lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
    exact = (count == hi - lo).all()
    monotone = (lo[:, 1:] >= lo[:, :-1]).all() & (hi[:, 1:] >= hi[:, :-1]).all()
    if not bool(exact & monotone):
        return None
    return torch.stack((lo, hi), dim=1).contiguous()


def causal_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The causal mask as a mask function (top-left: ``kv_idx <= q_idx``), as document masks use it."""
    return kv_idx <= q_idx
