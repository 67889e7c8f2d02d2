"""Host-side planning of the TMA tensor descriptors (Hopper's bulk tensor copies).

A kernel reads a (rows, head_dim) tile of one head of one sequence. A 2-D descriptor addresses
``base + row * row_stride + col``; a canonical (batch, seqlen, heads, head_dim) view maps onto
one in two ways:

* **rows**: the batch and head offsets are whole multiples of the sequence stride, so
  ``row = b * rb + h * rh + s`` and ``col = d`` (the bhsd layout, contiguous or padded);
* **columns**: heads sit side by side inside a token (head stride = head_dim), so
  ``row = b * rb + s`` and ``col = h * head_dim + d`` (the bshd layout, packed qkv too). A tile
  there must cover exactly one head, so this needs ``head_dim`` to be the tile width.

TMA also needs a 16-byte aligned base and 16-byte multiple strides. Anything else returns
``None`` and the kernel uses pointer loads. Rows past the end of the tensor read as zeros; rows
of a neighbouring sequence or head are never used because the kernels load only fully visible,
fully valid tiles through descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowMap:
    """How (batch, head, token) maps to a descriptor's (row, column); the three ints go to the kernel."""

    rb: int
    rh: int
    ch: int
    rows: int
    cols: int
    row_stride: int


def row_map(t: torch.Tensor, head_dim: int, tile_cols: int, batch: int, varlen: bool) -> RowMap | None:
    """The 2-D view of canonical ``t`` (B, S, H, D) for descriptor tiles of ``tile_cols`` columns, or None."""
    _, seqlen, heads, _ = t.shape
    sb, ss, sh, sd = t.stride()
    item = t.element_size()
    if varlen:
        batch, sb = 1, 0
    if sd != 1 or ss <= 0 or seqlen == 0 or t.data_ptr() % 16 or (ss * item) % 16:
        return None
    if batch > 1 and sb % ss:
        return None
    rb = sb // ss if batch > 1 else 0
    if heads == 1 or sh % ss == 0:  # rows mode
        rh = sh // ss if heads > 1 else 0
        rows = (batch - 1) * rb + (heads - 1) * rh + seqlen
        return RowMap(rb, rh, 0, rows, head_dim, ss)
    if sh == head_dim == tile_cols and heads * head_dim <= ss:  # columns mode
        rows = (batch - 1) * rb + seqlen
        return RowMap(rb, 0, head_dim, rows, heads * head_dim, ss)
    return None


def descriptor(t: torch.Tensor, mapping: RowMap, block_rows: int, tile_cols: int):
    """A host ``TensorDescriptor`` over canonical ``t`` for (block_rows, tile_cols) tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, [mapping.rows, mapping.cols], [mapping.row_stride, 1], [block_rows, tile_cols])
