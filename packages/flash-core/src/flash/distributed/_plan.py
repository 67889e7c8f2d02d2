"""Which attention calls a rank makes on the K/V block it holds at one ring step.

A rank's queries and the K/V block in hand are each a few chunks of the global sequence. Each
(query chunk, key chunk) pair is hidden (no call), fully visible, or partially visible. A
visible part is cut to the rows that see some key and the keys some row sees, and its mask is
written in the spec's own terms: a bottom-right aligned ``(left, right)`` window on the local
indices, derived from the global one. Parts are then merged into one call over their bounding
rectangle wherever the mask there is still such a window (fewer, larger kernel calls; the tiles
a window hides cost a kernel nothing): with zig-zag sharding and a causal mask, every step is one
call.

Plans are pure functions of integers (cached): the same ring always makes the same calls in the
same order, which is what makes the ring deterministic.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from flash.distributed.sharding import Sharding, chunks_per_rank, rank_chunks
from flash.spec import UNBOUNDED


@dataclass(frozen=True)
class Block:
    """One attention call: local query rows ``[rows)`` against local key rows ``[cols)`` of the block."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    window: tuple[int, int]  # (left, right) in the spec's bottom-right terms; (-1, -1) = no mask

    @property
    def causal(self) -> bool:
        return self.window == (UNBOUNDED, 0)

    @property
    def options(self) -> tuple[bool, tuple[int, int] | None]:
        """``(causal, window)`` as :func:`flash.attention` takes them: plain causal where it is one, so
        backends without window support can still run the call."""
        if self.window == (UNBOUNDED, UNBOUNDED):
            return False, None
        if self.causal:
            return True, None
        return False, self.window


def _positions(world_size: int, rank: int, sharding: Sharding, chunk: int, lo: int, hi: int) -> Tensor:
    """Global positions of local rows ``[lo, hi)`` of ``rank``'s shard (chunks of ``chunk`` tokens)."""
    local = torch.arange(lo, hi)
    starts = torch.tensor(rank_chunks(world_size, rank, sharding)) * chunk
    return starts[local // chunk] + local % chunk


def _visible(rows: Tensor, cols: Tensor, bounds: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per row (global position), the keys ``[lo, hi)`` it sees among ``cols`` (increasing global positions)."""
    left, right = bounds
    n = cols.numel()
    lo = torch.zeros_like(rows) if left == UNBOUNDED else torch.searchsorted(cols, rows - left)
    hi = torch.full_like(rows, n) if right == UNBOUNDED else torch.searchsorted(cols, rows + right, right=True)
    return lo, hi


def _window_for(rows: Tensor, cols: Tensor, bounds: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(left, right)`` whose bottom-right mask on the local block equals the global mask, or None."""
    lo, hi = _visible(rows, cols, bounds)
    seen = lo < hi
    len_q, len_k = rows.numel(), cols.numel()
    i = torch.arange(len_q)
    offset = len_k - len_q
    # A side is unbounded if no row that sees anything is cut on it; else one unclamped row fixes it.
    cut_right = seen & (hi < len_k)
    cut_left = seen & (lo > 0)
    right = int((hi - 1 - i - offset)[cut_right][0]) if cut_right.any() else UNBOUNDED
    left = int((i + offset - lo)[cut_left][0]) if cut_left.any() else UNBOUNDED
    if (cut_right.any() and right < 0) or (cut_left.any() and left < 0):
        return None
    spec_lo = torch.zeros_like(i) if left == UNBOUNDED else (i + offset - left).clamp(0, len_k)
    spec_hi = torch.full_like(i, len_k) if right == UNBOUNDED else (i + offset + right + 1).clamp(0, len_k)
    spec_seen = spec_lo < spec_hi
    if not torch.equal(spec_seen, seen):
        return None
    return (left, right) if torch.equal(spec_lo[seen], lo[seen]) and torch.equal(spec_hi[seen], hi[seen]) else None


class _Shard:
    """Global positions of one rank's shard."""

    def __init__(self, world_size: int, rank: int, sharding: Sharding, length: int) -> None:
        self.world_size, self.rank, self.sharding = world_size, rank, sharding
        self.chunk = length // chunks_per_rank(sharding)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        count = chunks_per_rank(self.sharding)
        return [(index * self.chunk, (index + 1) * self.chunk) for index in range(count)]

    def positions(self, lo: int, hi: int) -> Tensor:
        return _positions(self.world_size, self.rank, self.sharding, self.chunk, lo, hi)


def _pair(
    queries: _Shard, keys: _Shard, rows: tuple[int, int], cols: tuple[int, int], bounds: tuple[int, int]
) -> Block | None:
    """The call for one (query chunk, key chunk) pair, cut to what is visible, or None if hidden."""
    q_pos, k_pos = queries.positions(*rows), keys.positions(*cols)
    lo, hi = _visible(q_pos, k_pos, bounds)
    seen = (lo < hi).nonzero().flatten()
    if seen.numel() == 0:
        return None
    r0, r1 = rows[0] + int(seen[0]), rows[0] + int(seen[-1]) + 1
    c0, c1 = cols[0] + int(lo[seen].min()), cols[0] + int(hi[seen].max())
    window = _window_for(queries.positions(r0, r1), keys.positions(c0, c1), bounds)
    # Within one chunk pair the mask is a band of a contiguous sequence: always a window once cut.
    assert window is not None, (rows, cols, bounds)
    return Block((r0, r1), (c0, c1), window)


def _overlaps(a: Block, b: Block) -> bool:
    return a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1] and a.cols[0] < b.cols[1] and b.cols[0] < a.cols[1]


def _merged(
    group: list[Block], others: list[Block], queries: _Shard, keys: _Shard, bounds: tuple[int, int]
) -> Block | None:
    """One call over the bounding rectangle of ``group``, if it meets no other call and its mask is a window."""
    rows = (min(b.rows[0] for b in group), max(b.rows[1] for b in group))
    cols = (min(b.cols[0] for b in group), max(b.cols[1] for b in group))
    box = Block(rows, cols, (UNBOUNDED, UNBOUNDED))
    if any(_overlaps(box, other) for other in others):
        return None
    window = _window_for(queries.positions(*rows), keys.positions(*cols), bounds)
    return None if window is None else Block(rows, cols, window)


def _coalesce(blocks: list[Block], queries: _Shard, keys: _Shard, bounds: tuple[int, int]) -> list[Block]:
    """Merge calls, largest groups first (at most four parts: 11 candidate groups)."""
    for size in range(len(blocks), 1, -1):
        for group in itertools.combinations(range(len(blocks)), size):
            inside = [blocks[index] for index in group]
            outside = [block for index, block in enumerate(blocks) if index not in group]
            merged = _merged(inside, outside, queries, keys, bounds)
            if merged is not None:
                return _coalesce([*outside, merged], queries, keys, bounds)
    return blocks


@functools.lru_cache(maxsize=256)
def step_blocks(
    world_size: int, rank: int, source: int, sharding: Sharding, length: int, bounds: tuple[int, int]
) -> tuple[Block, ...]:
    """The calls ``rank`` makes with the K/V shard of rank ``source`` in hand.

    ``length`` is the shard length (every rank's), ``bounds`` the global ``(left, right)`` mask
    (``right = 0`` for causal). Queries and keys are one sequence, so global row ``i`` sees global
    key ``j`` iff ``i - left <= j <= i + right``.
    """
    if length == 0:
        return ()
    queries = _Shard(world_size, rank, sharding, length)
    keys = _Shard(world_size, source, sharding, length)
    blocks = [
        block
        for rows in queries.chunk_ranges()
        for cols in keys.chunk_ranges()
        if (block := _pair(queries, keys, rows, cols, bounds)) is not None
    ]
    blocks = _coalesce(blocks, queries, keys, bounds)
    return tuple(sorted(blocks, key=lambda block: (block.rows, block.cols)))


#: Tokens per chunk when planning a packed batch: two tell a causal diagonal from a full pair.
_UNIT = 2


@functools.lru_cache(maxsize=256)
def packed_step_blocks(
    world_size: int, rank: int, source: int, sharding: Sharding, length: int, bounds: tuple[int, int]
) -> tuple[Block, ...]:
    """The calls of one step for a packed (variable-length) batch.

    A rank's packed shard is one *region* per chunk it holds: that chunk of every sequence, packed
    (``length`` tokens in all). Sequences have different lengths, so only masks whose pattern over
    chunk pairs does not depend on the length are planned: causal or none. Each visible (query
    region, key region) pair is one call, with the regions' common ``cu_seqlens``.
    """
    if bounds not in ((UNBOUNDED, UNBOUNDED), (UNBOUNDED, 0)):
        raise ValueError(f"packed batches take a causal mask or none, not {bounds}")
    count = chunks_per_rank(sharding)
    region = length // count
    queries = _Shard(world_size, rank, sharding, count * _UNIT)
    keys = _Shard(world_size, source, sharding, count * _UNIT)
    blocks = []
    for a, rows in enumerate(queries.chunk_ranges()):
        for b, cols in enumerate(keys.chunk_ranges()):
            pair = _pair(queries, keys, rows, cols, bounds)
            if pair is not None:
                assert (pair.rows, pair.cols) == (rows, cols), pair  # causal or full pairs are never cut
                blocks.append(Block((a * region, (a + 1) * region), (b * region, (b + 1) * region), pair.window))
    return tuple(blocks)
