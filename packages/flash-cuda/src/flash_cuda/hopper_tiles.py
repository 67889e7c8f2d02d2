"""Hopper (sm_90a) forward tiles: which tiles and tile order a problem class runs with.

The tile table (:data:`TABLE`, :data:`FP8_TABLE`: one measured or reasoned row per compiled head dim,
mask kind and key-length bucket, with its provenance) and the choice of tile order per problem
(:func:`tile_order`). Runs 1-3 of the measurements: PERF_NOTES.md, "Hopper kernel". This module imports
neither flash-core nor CuPy (torch only inside :func:`tile_order`'s balance estimate).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: Head dims a kernel is compiled for; a problem's head dim rounds up to the next (zero-filled columns).
SHIPPED_HEAD_DIMS = (64, 96, 128, 192, 256)
#: fp8 tiles are whole 64-byte swizzle rows.
FP8_HEAD_DIMS = (64, 128, 192, 256)
#: Mask kinds of a window, in the kernels' numbering (HOPPER_MASK), and their names.
MASK_NONE, MASK_RIGHT, MASK_BOTH = 0, 1, 2
MASK_NAMES = {MASK_NONE: "full", MASK_RIGHT: "causal", MASK_BOTH: "window"}
#: The forward's fourth kind: the window's edges and each query row's interval of keys from global
#: memory (a key-padding mask, a block mask's key_intervals); 16-bit inputs only.
MASK_INTERVALS = 3
#: The forward's fifth kind: a block-sparse mask's lists of key blocks (no window; 16-bit inputs only).
#: Its tiles are one block row of the mask (128 query rows: two consumers) and its key blocks divide
#: the mask's (BLOCK_SPARSE_ROWS, a power of two >= block_n).
MASK_LISTS = 4
BLOCK_SPARSE_ROWS = 128
FORWARD_MASK_NAMES = {**MASK_NAMES, MASK_INTERVALS: "intervals", MASK_LISTS: "block_sparse"}


#: Tile orders of the kernel (blocks_outer = 0, 1); a table row may also say "auto" (see tile_order).
ORDERS = ("heads", "blocks")
#: "auto" takes the "heads" order unless it would leave the persistent blocks' work this unbalanced.
BALANCE_FOR_HEADS = 0.9


@dataclass(frozen=True)
class HopperConfig:
    """Tiles and tile order of one problem class: 64 * consumers query rows per tile, block_n keys
    per block; order "heads" walks the tiles head by head (K and V shared in L2), "blocks" query
    block by query block, heaviest first (longest work first: balances causal and varlen work),
    "auto" picks per problem (:func:`tile_order`)."""

    consumers: int  # consumer warpgroups: 2 (240 registers each) or 3 (160 registers each)
    block_n: int
    order: str = "heads"
    q_stages: int = 1  # Q buffers: 2 loads the next tile's Q while this one runs (short sequences)

    @property
    def block_m(self) -> int:
        return 64 * self.consumers


@dataclass(frozen=True)
class TableRow:
    head_dim: int  # compiled head dim
    mask: int  # MASK_NONE, MASK_RIGHT or MASK_BOTH
    max_seqlen_k: int | None  # the row serves problems with seqlen_k up to this (None: any)
    config: HopperConfig
    provenance: str  # "measured: GPU, date, versions, what" or "unmeasured: why this guess"


_H200 = "measured: NVIDIA H200, 2026-12-02, torch 2.11.0+cu130, CUDA 13.0, CuPy 14.2.0, NVRTC 13.0, bf16"
_AUTO = "order auto (run 2: heads order won where its balance was 0.97, blocks won at 0.83 and 0.65)"

_INTERVALS = (
    "unmeasured: the window rows' key blocks under two consumer warpgroups (the tile's key range and "
    "first/last rows' intervals are per tile, like a window's); order blocks, as varlen, since the host "
    "does not know the intervals"
)

_LISTS = (
    "unmeasured: one mask block row per tile (two consumers), the key blocks of the interval rows but 128 "
    "keys at d96 (a power of two, to divide the mask's blocks); Q double-buffered where it fits (tiles of a "
    "sparse mask are short: the tile boundary is a larger share), order heads (K and V of a head in L2)"
)

#: Tiles per (compiled head dim, mask kind, seqlen_k bucket); the first row that fits a problem
#: serves it. Problems of other head dims use the next shipped one. Runs 1-3: PERF_NOTES.md.
TABLE: tuple[TableRow, ...] = (
    TableRow(64, MASK_NONE, None, HopperConfig(3, 128), f"{_H200}: best of 5 tiles at 8k (run 1), of 3 at 1k (run 3)"),
    TableRow(
        64, MASK_RIGHT, 2048, HopperConfig(2, 128, "auto", 2), f"{_H200}: 299 vs 250 TFLOP/s for 192x128 at 1k (run 3)"
    ),
    TableRow(64, MASK_RIGHT, None, HopperConfig(3, 128, "auto"), f"{_H200}: best of 3 at 8k (run 2); {_AUTO}"),
    TableRow(64, MASK_BOTH, None, HopperConfig(3, 128, "auto"), "unmeasured: as causal"),
    TableRow(96, MASK_NONE, 4096, HopperConfig(2, 128, "heads", 2), "unmeasured: as d128 up to 4k"),
    TableRow(96, MASK_NONE, None, HopperConfig(2, 192), f"{_H200}: best of 3 tiles at 8k (run 2)"),
    TableRow(96, MASK_RIGHT, None, HopperConfig(2, 176, "auto"), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(96, MASK_BOTH, None, HopperConfig(2, 128, "auto"), "unmeasured: as causal, narrower"),
    TableRow(
        128, MASK_NONE, 4096, HopperConfig(2, 128, "heads", 2), f"{_H200}: +3% over 128x176 at 4k, even at 1k (run 3)"
    ),
    TableRow(128, MASK_NONE, None, HopperConfig(2, 176), f"{_H200}: best of 3-5 tiles at 8k (runs 1-3)"),
    TableRow(128, MASK_RIGHT, 4096, HopperConfig(2, 128, "auto", 2), f"{_H200}: +3% at 4k, even at 1k (run 3)"),
    TableRow(128, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), f"{_H200}: best of 4 at 8k (run 2); {_AUTO}"),
    TableRow(128, MASK_BOTH, None, HopperConfig(2, 128, "auto"), "unmeasured: as causal"),
    TableRow(192, MASK_NONE, None, HopperConfig(2, 96), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(192, MASK_RIGHT, None, HopperConfig(2, 96, "auto"), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(192, MASK_BOTH, None, HopperConfig(2, 96, "auto"), "unmeasured: as causal"),
    TableRow(256, MASK_NONE, None, HopperConfig(2, 80), f"{_H200}: best of 2 tiles at 8k (runs 1-2)"),
    TableRow(256, MASK_RIGHT, None, HopperConfig(2, 80, "auto"), f"{_H200}: best of 3 at 8k (run 2); {_AUTO}"),
    TableRow(256, MASK_BOTH, None, HopperConfig(2, 64, "auto"), "unmeasured: as causal, narrower (registers)"),
    *(
        TableRow(d, MASK_INTERVALS, None, HopperConfig(2, n, "blocks"), _INTERVALS)
        for d, n in ((64, 128), (96, 128), (128, 128), (192, 96), (256, 64))
    ),
    *(
        TableRow(d, MASK_LISTS, None, HopperConfig(2, n, "heads", q), _LISTS)
        for d, n, q in ((64, 128, 2), (96, 128, 2), (128, 128, 2), (192, 64, 2), (256, 64, 1))
    ),
)


_FP8 = (
    "unmeasured: the bf16 tiles' shape where it fits (V^T rows of 64 or 128 keys), the only tiles tried; "
    "timed on the H200 2026-12-02 (PERF_NOTES.md), not compared with others"
)

_H200_FP8 = "measured: NVIDIA H200, 2026-12-02, e4m3, three consumer warpgroups (one process)"

#: fp8 inputs (e4m3, e5m2): key blocks of 64 or 128 (a V^T row is one swizzle span, one TMA box row).
FP8_TABLE: tuple[TableRow, ...] = (
    TableRow(64, MASK_NONE, None, HopperConfig(3, 128), f"{_H200_FP8}: 604.9 vs 437.9 TFLOP/s for 128x128 at 8k"),
    TableRow(
        64, MASK_RIGHT, None, HopperConfig(3, 128, "auto"), f"{_H200_FP8}: 520.8 vs 409.3 TFLOP/s for 128x128 at 8k"
    ),
    TableRow(64, MASK_BOTH, None, HopperConfig(3, 128, "auto"), "unmeasured: as causal"),
    TableRow(128, MASK_NONE, None, HopperConfig(2, 128), _FP8),
    TableRow(128, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(128, MASK_BOTH, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(192, MASK_NONE, None, HopperConfig(2, 128), _FP8),
    TableRow(192, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(192, MASK_BOTH, None, HopperConfig(2, 64, "auto"), _FP8),
    TableRow(256, MASK_NONE, None, HopperConfig(2, 64), _FP8),
    TableRow(256, MASK_RIGHT, None, HopperConfig(2, 64, "auto"), _FP8),
    TableRow(256, MASK_BOTH, None, HopperConfig(2, 64, "auto"), _FP8),
)


def compiled_head_dim(head_dim: int, fp8: bool = False) -> int:
    """The shipped head dim a problem runs at (the next one up; extra columns are zeros)."""
    for d in FP8_HEAD_DIMS if fp8 else SHIPPED_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim {head_dim} > {SHIPPED_HEAD_DIMS[-1]}")


def mask_kind(window: tuple[int, int], intervals: bool = False, lists: bool = False) -> int:
    """The mask a ``(left, right)`` window needs (-1: unbounded side; causal is (-1, 0)); ``intervals``:
    each query row also has an interval of keys (the forward's MASK_INTERVALS, any window); ``lists``: a
    block-sparse mask's lists (MASK_LISTS, no window)."""
    if lists:
        return MASK_LISTS
    if intervals:
        return MASK_INTERVALS
    left, right = window
    if left < 0 and right < 0:
        return MASK_NONE
    return MASK_RIGHT if left < 0 else MASK_BOTH


def table_row(head_dim: int, mask: int, seqlen_k: int | None = None, fp8: bool = False) -> TableRow:
    d = compiled_head_dim(head_dim, fp8)
    for row in FP8_TABLE if fp8 else TABLE:
        fits = row.max_seqlen_k is None or (seqlen_k is not None and seqlen_k <= row.max_seqlen_k)
        if row.head_dim == d and row.mask == mask and fits:
            return row
    raise KeyError(f"no Hopper table row for head dim {d}, mask {FORWARD_MASK_NAMES[mask]}")


def config_for(
    head_dim: int,
    window: tuple[int, int] = (-1, -1),
    seqlen_k: int | None = None,
    fp8: bool = False,
    intervals: bool = False,
    lists: bool = False,
) -> HopperConfig:
    """The tiles for a problem class: head dim (before rounding up), ``(left, right)`` window,
    (longest) key sequence length, whether the inputs are fp8, whether rows have key intervals and
    whether tiles walk a block-sparse mask's lists."""
    return table_row(head_dim, mask_kind(window, intervals, lists), seqlen_k, fp8).config


def _block_costs(m_blocks: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, window: tuple) -> list[int]:
    """Key blocks each query block sees (the kernel's make_tile), plus one for its fixed costs."""
    left, right = window
    off = seqlen_k - seqlen_q
    costs = []
    for m in range(m_blocks):
        m0 = m * block_m
        rows = min(block_m, seqlen_q - m0)
        hi = seqlen_k if right < 0 else max(0, min(seqlen_k, m0 + rows - 1 + off + right + 1))
        lo = 0 if left < 0 else max(0, min(seqlen_k, m0 + off - left))
        costs.append(1 + (-(-hi // block_n) - lo // block_n if hi > lo else 0))
    return costs


@functools.lru_cache(maxsize=512)
def _heads_order_balance(
    m_blocks: int, pairs: int, grid: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, window: tuple
) -> float:
    """Mean over max of the persistent blocks' work when tiles go in "heads" order, round by round
    in alternating directions (the kernel's tile_index)."""
    import torch

    costs = torch.tensor(_block_costs(m_blocks, block_m, block_n, seqlen_q, seqlen_k, window), dtype=torch.float64)
    t = torch.arange(m_blocks * pairs)
    rounds, i = t // grid, t % grid
    owner = torch.where(rounds % 2 == 1, grid - 1 - i, i)
    load = torch.zeros(grid, dtype=torch.float64).index_add_(0, owner, costs[m_blocks - 1 - t % m_blocks])
    return float(load.mean() / load.max())


def tile_order(
    config: HopperConfig, *, m_blocks: int, pairs: int, grid: int, seqlen_q: int, seqlen_k: int, window: tuple,
    varlen: bool,
) -> str:  # fmt: skip
    """The kernel's tile order for a problem: the config's, or for "auto" the "heads" order (few heads'
    K and V in L2 at a time) unless it balances the blocks' work worse than BALANCE_FOR_HEADS (causal
    tiles of very different lengths piling up); then, and for varlen batches whose lengths the host
    does not know, "blocks" (longest work first)."""
    if config.order != "auto":
        return config.order
    if varlen:
        return "blocks"
    if m_blocks * pairs > 1 << 22:  # so many rounds that any order balances
        return "heads"
    balance = _heads_order_balance(
        m_blocks, pairs, grid, config.block_m, config.block_n, seqlen_q, seqlen_k, tuple(window)
    )
    return "heads" if balance >= BALANCE_FOR_HEADS else "blocks"
