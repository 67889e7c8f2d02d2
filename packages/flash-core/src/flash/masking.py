"""Which keys each query sees, and which tiles a mask hides.

One definition for every backend. Query row ``i`` of a sequence with ``len_q``
queries and ``len_k`` keys sees key ``j`` iff
``i + off - left <= j <= i + off + right`` where ``off = len_k - len_q``
(bottom-right alignment) and an unbounded side is ``-1``. ``causal`` is
``right = 0``. The visible range of a row only moves right as ``i`` grows, which
is what lets a tiled kernel skip whole tiles.
"""

from __future__ import annotations

import enum

import torch

from flash.spec import UNBOUNDED


def visible_key_range(i: int, len_q: int, len_k: int, bounds: tuple[int, int]) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that query row ``i`` sees, for mask ``bounds = (left, right)``.

    The range may be empty (``lo == hi``): such a row outputs 0 and its LSE is -inf.
    """
    left, right = bounds
    offset = len_k - len_q
    lo = 0 if left == UNBOUNDED else min(len_k, max(0, i + offset - left))
    hi = len_k if right == UNBOUNDED else min(len_k, max(0, i + offset + right + 1))
    return lo, max(lo, hi)


class Tile(enum.Enum):
    """How a mask covers a (query block, key block) tile."""

    HIDDEN = "hidden"  # no query of the block sees any key of the block: skip it
    PARTIAL = "partial"  # compute, then apply the mask
    VISIBLE = "visible"  # compute, no mask needed


def classify_tile(
    rows: tuple[int, int], cols: tuple[int, int], len_q: int, len_k: int, bounds: tuple[int, int]
) -> Tile:
    """Classify the tile of query rows ``[i0, i1)`` and keys ``[j0, j1)`` (both non-empty)."""
    (i0, i1), (j0, j1) = rows, cols
    first_lo, first_hi = visible_key_range(i0, len_q, len_k, bounds)
    last_lo, last_hi = visible_key_range(i1 - 1, len_q, len_k, bounds)
    if last_hi <= j0 or first_lo >= j1:
        return Tile.HIDDEN
    if last_lo <= j0 and first_hi >= j1:
        return Tile.VISIBLE
    return Tile.PARTIAL


def tile_mask(
    rows: tuple[int, int], cols: tuple[int, int], len_q: int, len_k: int, bounds: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Boolean (rows, cols) mask of the tile, True where the query sees the key."""
    left, right = bounds
    offset = len_k - len_q
    i = torch.arange(rows[0], rows[1], device=device)[:, None] + offset
    j = torch.arange(cols[0], cols[1], device=device)[None, :]
    seen = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        seen &= j >= i - left
    if right != UNBOUNDED:
        seen &= j <= i + right
    return seen


def visible_matmul(p: torch.Tensor, v: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``p @ v`` where a key a row does not see contributes nothing, even a NaN or inf value.

    ``p`` is (..., rows, keys) and zero wherever ``seen`` (rows, keys, broadcast) is False; a plain
    product would still multiply those zeros by the values, and ``0 * nan`` is NaN: one garbage
    value (an unused KV-cache slot, say) would poison every row of the tile. The finite values go
    through one product; the non-finite ones reach exactly the rows that see them, with IEEE's
    rules (NaN wins, +inf and -inf together make NaN).
    """
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(p, v)
    out = torch.matmul(p, torch.where(finite, v, torch.zeros_like(v)))
    sees = torch.broadcast_to(seen, p.shape).to(v.dtype)

    def reaches(kind: torch.Tensor) -> torch.Tensor:
        return torch.matmul(sees, kind.to(v.dtype)) > 0

    nan, pos, neg = reaches(torch.isnan(v)), reaches(v == float("inf")), reaches(v == float("-inf"))
    out = torch.where(pos, torch.full_like(out, float("inf")), out)
    out = torch.where(neg, torch.full_like(out, float("-inf")), out)
    return torch.where(nan | (pos & neg), torch.full_like(out, float("nan")), out)
