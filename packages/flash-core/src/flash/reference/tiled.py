"""FlashAttention in pure torch: tiled, online softmax, backward by recomputation.

This is the algorithm the GPU kernels implement, written with torch tensor ops so
it runs anywhere (it is the ``reference`` backend, what a machine without a GPU
uses). Memory is O(N * block): no N x N matrix is ever formed.

Forward, for each query block ``Q_i`` (all heads at once), over the key blocks
``K_j, V_j`` that the mask does not hide::

    S   = scale * Q_i K_j^T           (softcap: S = c * tanh(S / c))
    m'  = max(m, rowmax(S))
    P   = exp(S - m')
    l   = l * exp(m - m') + rowsum(P)
    acc = acc * exp(m - m') + P V_j
    m   = m'

then ``O_i = acc / l`` and ``LSE_i = m + log(l)``. The backward walks key blocks,
recomputes ``P = exp(S - LSE)`` per tile and never stores it.

GQA: a key/value head serves ``group`` query heads; the query heads of a group
are stacked along the row axis of a tile, so K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from flash import dropout
from flash.backend import BackwardArgs, ForwardArgs, MaskTensors
from flash.masking import Tile, classify_tile, tile_mask, visible_matmul
from flash.reference.oracle import descaled
from flash.spec import AttentionSpec
from flash.terms import Region, Terms, region


@dataclass(frozen=True)
class TileStep:
    """State of one query block after folding in one key block (for tracing and teaching)."""

    query_block: int
    key_block: int
    scores: torch.Tensor  # S of this tile, (batch, heads_kv, group * rows, cols)
    row_max: torch.Tensor  # m after the tile
    row_sum: torch.Tensor  # l after the tile
    output: torch.Tensor  # acc / l after the tile: the output if no further key block came


Observer = Callable[[TileStep], None]


@dataclass(frozen=True)
class _Segment:
    """A run of rows that share lengths: the whole padded batch, or one varlen sequence."""

    batch: slice  # into the canonical batch axis
    batch_ids: list[int]  # sequence indices (for dropout)
    descale_index: int | None  # row of per-(batch, head) descale factors, None for the padded batch
    q0: int
    len_q: int
    k0: int
    len_k: int


def _segments(spec: AttentionSpec, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None) -> Iterator[_Segment]:
    if cu_q is None or cu_k is None:
        yield _Segment(slice(None), list(range(spec.batch)), None, 0, spec.seqlen_q, 0, spec.seqlen_k)
        return
    offs_q, offs_k = cu_q.tolist(), cu_k.tolist()
    for b in range(spec.batch):
        yield _Segment(slice(0, 1), [b], b, offs_q[b], offs_q[b + 1] - offs_q[b], offs_k[b], offs_k[b + 1] - offs_k[b])


def _compute_dtype(spec: AttentionSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.float64 else torch.float32


def _by_kv_head(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """(B, S, Hq, ...) -> (B, Hkv, group, S, ...) view."""
    t = t.unflatten(2, (spec.heads_kv, spec.group_size))
    return t.movedim(1, 3)


def _stack_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, group, rows, ...) -> (B, Hkv, group * rows, ...): a group's heads stacked as rows."""
    return t.flatten(2, 3)


def _unstack_rows(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Inverse of :func:`_stack_rows` back to canonical (B, rows, Hq, ...) order."""
    t = t.unflatten(2, (spec.group_size, -1))  # (B, Hkv, G, rows, ...)
    return t.movedim(3, 1).flatten(2, 3)


class Scores(NamedTuple):
    """A tile's scores: after softcap, before score_mod (after ALiBi and the additive mask), final."""

    capped: torch.Tensor
    pre_mod: torch.Tensor
    final: torch.Tensor


class _Tiles:
    """Per-segment tile bookkeeping shared by forward and backward."""

    def __init__(
        self,
        spec: AttentionSpec,
        seg: _Segment,
        block_q: int,
        block_k: int,
        device: torch.device,
        masks: MaskTensors | None,
    ):
        self.spec, self.seg, self.device = spec, seg, device
        self.block_q, self.block_k = block_q, block_k
        self.bounds = spec.mask_bounds
        self.terms = Terms(spec, masks)

    def query_blocks(self) -> Iterator[tuple[int, int, int]]:
        for index, i0 in enumerate(range(0, self.seg.len_q, self.block_q)):
            yield index, i0, min(i0 + self.block_q, self.seg.len_q)

    def key_blocks(self) -> Iterator[tuple[int, int, int]]:
        for index, j0 in enumerate(range(0, self.seg.len_k, self.block_k)):
            yield index, j0, min(j0 + self.block_k, self.seg.len_k)

    def kind(self, rows: tuple[int, int], cols: tuple[int, int]) -> Tile:
        if not self.spec.masked:
            return Tile.PARTIAL if self.spec.extra_masks else Tile.VISIBLE
        kind = classify_tile(rows, cols, self.seg.len_q, self.seg.len_k, self.bounds, self.spec.sink_tokens)
        return Tile.PARTIAL if kind is Tile.VISIBLE and self.spec.extra_masks else kind

    def region(self, rows: tuple[int, int], cols: tuple[int, int]) -> Region:
        return region(self.seg.batch_ids, self.spec.heads_q, rows, cols, self.seg.len_q, self.seg.len_k, self.device)

    def _by_head(self, s: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, G * R, C) stacked rows -> (B, Hq, R, C)."""
        return s.unflatten(2, (self.spec.group_size, -1)).flatten(1, 2)

    def _stacked(self, s: torch.Tensor) -> torch.Tensor:
        """(B, Hq, R, C) -> (B, Hkv, G * R, C) stacked rows (broadcast axes expanded)."""
        s = s.expand(self.seg_batch, self.spec.heads_q, *s.shape[2:])
        return s.unflatten(1, (self.spec.heads_kv, self.spec.group_size)).flatten(2, 3)

    @property
    def seg_batch(self) -> int:
        return len(self.seg.batch_ids)

    def scores(
        self, q_rows: torch.Tensor, k_tile: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]
    ) -> Scores:
        """The tile's scores at each step of :mod:`flash.terms`'s order (stacked rows)."""
        s = torch.matmul(q_rows, k_tile.transpose(-1, -2)).mul_(self.spec.scale)
        if self.spec.softcap:
            s = torch.tanh(s / self.spec.softcap).mul_(self.spec.softcap)
        if not self.spec.score_terms:
            return Scores(s, s, s)
        where = self.region(rows, cols)
        spec = self.spec
        pre_mod = self._by_head(s)
        if spec.score_mod is not None:  # the terms before score_mod, then score_mod, kept apart for the backward
            pre_mod = Terms(dataclasses.replace(spec, score_mod=None), self.terms.tensors).add(pre_mod, where)
            final = spec.score_mod(pre_mod, where.b, where.h, where.i, where.j).to(pre_mod.dtype)
        else:
            final = pre_mod = self.terms.add(pre_mod, where)
        return Scores(s, self._stacked(pre_mod), self._stacked(final).contiguous())

    def score_mod_derivative(self, pre_mod: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        return self._stacked(self.terms.score_mod_derivative(self._by_head(pre_mod), self.region(rows, cols)))

    def seen(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """Which key each stacked row of the tile sees."""
        mask = tile_mask(rows, cols, self.seg.len_q, self.seg.len_k, self.bounds, self.device, self.spec.sink_tokens)
        mask = mask.repeat(self.spec.group_size, 1)
        extra = self.terms.seen(self.region(rows, cols)) if self.spec.extra_masks else None
        if extra is None:
            return mask
        return mask & self._stacked(torch.broadcast_to(extra, (*extra.shape[:2], rows[1] - rows[0], cols[1] - cols[0])))

    def hide(self, s: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], fill: float) -> torch.Tensor:
        return s.masked_fill_(~self.seen(rows, cols), fill)

    def keep(self, rows: tuple[int, int], cols: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Dropout keep mask of the tile, already scaled by 1 / (1 - p), in stacked-row order."""
        spec = self.spec
        mask = dropout.keep_mask(
            spec.dropout_seed,
            self.seg.batch_ids,
            torch.arange(spec.heads_q, device=self.device),
            torch.arange(*rows, device=self.device),
            torch.arange(*cols, device=self.device),
            spec.dropout_p,
        )  # (B, Hq, rows, cols)
        mask = mask.unflatten(1, (spec.heads_kv, spec.group_size)).flatten(2, 3)
        return mask.to(dtype) / (1.0 - spec.dropout_p)


def _inputs(spec: AttentionSpec, seg: _Segment, q, k, v, q_descale, k_descale, v_descale):
    """Segment views: q grouped (B, Hkv, G, Sq, D), k and v (B, Hkv, Sk, D); fp8 upcast with descale."""
    qs = q[seg.batch, seg.q0 : seg.q0 + seg.len_q]
    ks = k[seg.batch, seg.k0 : seg.k0 + seg.len_k]
    vs = v[seg.batch, seg.k0 : seg.k0 + seg.len_k]
    if spec.is_fp8:
        cd = _compute_dtype(spec)
        qs = descaled(qs, q_descale, seg.descale_index, cd)
        ks = descaled(ks, k_descale, seg.descale_index, cd)
        vs = descaled(vs, v_descale, seg.descale_index, cd)
    return _by_kv_head(qs, spec), ks.movedim(1, 2), vs.movedim(1, 2)


def forward(
    spec: AttentionSpec, args: ForwardArgs, block_q: int, block_k: int, observer: Observer | None = None
) -> None:
    """Fill ``args.out`` and ``args.lse`` (canonical views) for ``spec``."""
    cd = _compute_dtype(spec)
    for seg in _segments(spec, args.cu_seqlens_q, args.cu_seqlens_k):
        tiles = _Tiles(spec, seg, block_q, block_k, args.q.device, args.masks)
        q, k, v = _inputs(spec, seg, args.q, args.k, args.v, args.q_descale, args.k_descale, args.v_descale)
        for qi, i0, i1 in tiles.query_blocks():
            q_rows = _stack_rows(q[:, :, :, i0:i1]).to(cd)
            shape = q_rows.shape[:-1]
            row_max = q_rows.new_full(shape, float("-inf"))
            row_sum = q_rows.new_zeros(shape)
            acc = q_rows.new_zeros((*shape, v.shape[-1]))
            for kj, j0, j1 in tiles.key_blocks():
                kind = tiles.kind((i0, i1), (j0, j1))
                if kind is Tile.HIDDEN:
                    continue
                s = tiles.scores(q_rows, k[:, :, j0:j1].to(cd), (i0, i1), (j0, j1)).final
                if kind is Tile.PARTIAL:
                    tiles.hide(s, (i0, i1), (j0, j1), float("-inf"))
                scores = s.clone() if observer is not None else None
                new_max = torch.maximum(row_max, s.amax(dim=-1))
                # Rows that have seen no key yet keep max -inf; subtract 0 there so exp gives 0, not NaN.
                shift = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
                correction = torch.exp(row_max - shift)
                p = torch.exp_(s.sub_(shift[..., None]))
                row_sum = row_sum * correction + p.sum(dim=-1)
                if spec.dropout_p:
                    p = p * tiles.keep((i0, i1), (j0, j1), cd)
                v_tile = v[:, :, j0:j1].to(cd)
                if kind is Tile.PARTIAL:  # hidden keys contribute nothing, not even a NaN value
                    pv = visible_matmul(p, v_tile, tiles.seen((i0, i1), (j0, j1)))
                else:
                    pv = torch.matmul(p, v_tile)
                acc = acc * correction[..., None] + pv
                row_max = new_max
                if observer is not None:
                    out_now = acc / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)[..., None]
                    assert scores is not None  # cloned above whenever there is an observer
                    observer(TileStep(qi, kj, scores, row_max.clone(), row_sum.clone(), out_now))
            if args.sinks is not None:
                acc, row_max, row_sum = _with_sinks(spec, args.sinks, acc, row_max, row_sum, i1 - i0)
            unseen = row_sum == 0  # (a NaN sum is not "unseen": NaN inputs must propagate)
            out = acc / torch.where(unseen, torch.ones_like(row_sum), row_sum)[..., None]
            lse = torch.where(unseen, torch.full_like(row_sum, float("-inf")), row_max + torch.log(row_sum))
            rows = slice(seg.q0 + i0, seg.q0 + i1)
            args.out[seg.batch, rows].copy_(_unstack_rows(out, spec))
            args.lse[seg.batch, :, rows].copy_(lse.unflatten(2, (spec.group_size, -1)).flatten(1, 2))


def _with_sinks(
    spec: AttentionSpec, sinks: torch.Tensor, acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold each head's sink logit into the running (acc, max, sum) of its stacked rows: one more
    term of the denominator, with no value."""
    sink = sinks.to(row_max.dtype).view(spec.heads_kv, spec.group_size, 1).expand(-1, -1, rows).flatten(1)
    top = torch.maximum(row_max, sink)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    correction = torch.exp(row_max - shift)
    return acc * correction[..., None], top, row_sum * correction + torch.exp(sink - shift)


def backward(spec: AttentionSpec, args: BackwardArgs, block_q: int, block_k: int) -> None:
    """Fill ``args.dq``, ``args.dk``, ``args.dv`` from ``out``, ``lse`` and ``dout`` by recomputation."""
    cd = _compute_dtype(spec)
    for seg in _segments(spec, args.cu_seqlens_q, args.cu_seqlens_k):
        tiles = _Tiles(spec, seg, block_q, block_k, args.q.device, args.masks)
        q, k, v = _inputs(spec, seg, args.q, args.k, args.v, None, None, None)
        rows_all = slice(seg.q0, seg.q0 + seg.len_q)
        dout = _by_kv_head(args.dout[seg.batch, rows_all], spec)
        out = _by_kv_head(args.out[seg.batch, rows_all], spec)
        delta = (dout.to(cd) * out.to(cd)).sum(dim=-1)  # (B, Hkv, G, Sq): rowsum(dO * O)
        lse = args.lse[seg.batch, :, rows_all].unflatten(1, (spec.heads_kv, spec.group_size))
        # A row that saw no key has LSE -inf and P = 0: use +inf so that exp(S - LSE) = 0, not NaN.
        lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse).to(cd)
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        for _, j0, j1 in tiles.key_blocks():
            k_tile, v_tile = k[:, :, j0:j1].to(cd), v[:, :, j0:j1].to(cd)
            dk = torch.zeros(k_tile.shape, dtype=cd, device=q.device)
            dv = torch.zeros(v_tile.shape, dtype=cd, device=q.device)
            for _, i0, i1 in tiles.query_blocks():
                kind = tiles.kind((i0, i1), (j0, j1))
                if kind is Tile.HIDDEN:
                    continue
                q_rows = _stack_rows(q[:, :, :, i0:i1]).to(cd)
                do_rows = _stack_rows(dout[:, :, :, i0:i1]).to(cd)
                scores = tiles.scores(q_rows, k_tile, (i0, i1), (j0, j1))
                p = torch.exp(scores.final - _stack_rows(lse[..., i0:i1])[..., None])
                if kind is Tile.PARTIAL:
                    tiles.hide(p, (i0, i1), (j0, j1), 0.0)
                dp = torch.matmul(do_rows, v_tile.transpose(-1, -2))
                if spec.dropout_p:
                    keep = tiles.keep((i0, i1), (j0, j1), cd)
                    dv += torch.matmul((p * keep).transpose(-1, -2), do_rows)
                    dp.mul_(keep)
                else:
                    dv += torch.matmul(p.transpose(-1, -2), do_rows)
                ds = p.mul_(dp.sub_(_stack_rows(delta[..., i0:i1])[..., None]))
                if spec.score_mod is not None:
                    ds.mul_(tiles.score_mod_derivative(scores.pre_mod, (i0, i1), (j0, j1)))
                if args.dbias is not None:  # the additive mask's gradient is the scores' before score_mod
                    args.dbias[seg.batch, :, i0:i1, j0:j1] = tiles._by_head(ds).to(args.dbias.dtype)
                if spec.softcap:  # d(c tanh(x / c))/dx = 1 - tanh^2
                    ds.mul_(1.0 - (scores.capped / spec.softcap) ** 2)
                ds.mul_(spec.scale)
                dq[:, :, :, i0:i1] += torch.matmul(ds, k_tile).unflatten(2, (spec.group_size, -1))
                dk += torch.matmul(ds.transpose(-1, -2), q_rows)
            keys = slice(seg.k0 + j0, seg.k0 + j1)
            args.dk[seg.batch, keys].copy_(dk.movedim(1, 2))
            args.dv[seg.batch, keys].copy_(dv.movedim(1, 2))
        args.dq[seg.batch, rows_all].copy_(dq.movedim(3, 1).flatten(2, 3))
