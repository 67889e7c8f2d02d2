"""Which keys each query sees, and which tiles a mask hides.

One definition for every backend. Query row ``i`` of a sequence with ``len_q``
queries and ``len_k`` keys sees key ``j`` iff
``i + off - left <= j <= i + off + right`` where ``off = len_k - len_q``
(bottom-right alignment) and an unbounded side is ``-1``. ``causal`` is
``right = 0``. The visible range of a row only moves right as ``i`` grows, which
is what lets a tiled kernel skip whole tiles.

Sink tokens (StreamingLLM, ``sink_tokens = n``): the first ``n`` keys are exempt from the
left reach, so row ``i`` also sees every key ``j < n`` with ``j <= i + off + right``. They
relax the window's left edge only: a causal row still never sees a later key.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

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
    rows: tuple[int, int],
    cols: tuple[int, int],
    len_q: int,
    len_k: int,
    bounds: tuple[int, int],
    sink_tokens: int = 0,
) -> Tile:
    """Classify the tile of query rows ``[i0, i1)`` and keys ``[j0, j1)`` (both non-empty)."""
    (i0, i1), (j0, j1) = rows, cols
    first_lo, first_hi = visible_key_range(i0, len_q, len_k, bounds)
    last_lo, last_hi = visible_key_range(i1 - 1, len_q, len_k, bounds)
    if last_hi <= j0 or first_lo >= j1:
        # Sink tokens only add keys: a tile holding some may still be seen (its mask says where).
        return Tile.PARTIAL if j0 < sink_tokens else Tile.HIDDEN
    if last_lo <= j0 and first_hi >= j1:
        return Tile.VISIBLE
    return Tile.PARTIAL


def sees(position: torch.Tensor, j: torch.Tensor, bounds: tuple[int, int], sink_tokens: int = 0) -> torch.Tensor:
    """The rule itself, broadcast: True where a query at ``position`` (``i + off``) sees key ``j``."""
    left, right = bounds
    seen = torch.ones(torch.broadcast_shapes(position.shape, j.shape), dtype=torch.bool, device=j.device)
    if left != UNBOUNDED:
        seen &= (j >= position - left) | (j < sink_tokens)
    if right != UNBOUNDED:
        seen &= j <= position + right
    return seen


def tile_mask(
    rows: tuple[int, int],
    cols: tuple[int, int],
    len_q: int,
    len_k: int,
    bounds: tuple[int, int],
    device: torch.device,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Boolean (rows, cols) mask of the tile, True where the query sees the key."""
    i = torch.arange(rows[0], rows[1], device=device)[:, None] + (len_k - len_q)
    j = torch.arange(cols[0], cols[1], device=device)[None, :]
    return sees(i, j, bounds, sink_tokens)


def cache_mask(
    len_k: torch.Tensor, len_q: int, capacity: int, bounds: tuple[int, int], sink_tokens: int = 0
) -> torch.Tensor:
    """Boolean (batch, len_q, capacity) mask of a KV cache: sequence ``b`` holds ``len_k[b]`` keys
    (a tensor: no value leaves the device), the rule applies bottom-right aligned, and the slots
    past ``len_k[b]`` are hidden from every row."""
    i = torch.arange(len_q, device=len_k.device)[None, :, None]
    j = torch.arange(capacity, device=len_k.device)[None, None, :]
    ends = len_k.to(torch.int64)[:, None, None]
    return sees(i + ends - len_q, j, bounds, sink_tokens) & (j < ends)


def visible_matmul(p: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, *, fast_path: bool = True) -> torch.Tensor:
    """``p @ v`` where a key a row does not see contributes nothing, even a NaN or inf value.

    ``p`` is (..., rows, keys) and zero wherever ``seen`` (rows, keys, broadcast) is False; a plain
    product would still multiply those zeros by the values, and ``0 * nan`` is NaN: one garbage
    value (an unused KV-cache slot, say) would poison every row of the tile. The finite values go
    through one product; the non-finite ones reach exactly the rows that see them, with IEEE's
    rules (NaN wins, +inf and -inf together make NaN). ``fast_path=False`` skips the check that
    all values are finite (a device-to-host copy), for callers that must not synchronise.
    """
    finite = torch.isfinite(v)
    if fast_path and bool(finite.all()):
        return torch.matmul(p, v)
    out = torch.matmul(p, torch.where(finite, v, torch.zeros_like(v)))
    sees = torch.broadcast_to(seen, p.shape).to(v.dtype)

    def reaches(kind: torch.Tensor) -> torch.Tensor:
        return torch.matmul(sees, kind.to(v.dtype)) > 0

    nan, pos, neg = reaches(torch.isnan(v)), reaches(v == float("inf")), reaches(v == float("-inf"))
    out = torch.where(pos, torch.full_like(out, float("inf")), out)
    out = torch.where(neg, torch.full_like(out, float("-inf")), out)
    return torch.where(nan | (pos & neg), torch.full_like(out, float("nan")), out)


#: What :func:`made_once` made, per tensor: {(function, sizes): (the tensor's version, the result)}.
_made: WeakIdKeyDictionary = WeakIdKeyDictionary()


def made_once(make: Callable[..., Any], tensor: torch.Tensor, *sizes: int) -> Any:
    """``make(tensor, *sizes)``, made once per tensor while it is not changed in place (its version counter
    says so; an inference tensor has none and is summarised every time). The layers of a model and the
    backward share one mask, so each summary of it (a backend's padding runs, its tables) is made once,
    not per launch; summaries by different functions are kept side by side."""
    try:
        version = tensor._version
    except RuntimeError:
        return make(tensor, *sizes)
    entries = _made.get(tensor)
    if entries is None:
        entries = _made[tensor] = {}
    made = entries.get((make, sizes))
    if made is not None and made[0] == version:
        return made[1]
    result = make(tensor, *sizes)
    entries[(make, sizes)] = (version, result)
    return result


def key_runs(mask: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """int32 (batch|1, 4) ``(lo, hi, full_lo, full_hi)`` of a key-padding mask (batch|1, 1, 1, Sk|1).

    Sequence ``b`` sees no key outside ``[lo, hi)`` (``lo = hi = Sk`` when it sees none) and every key
    of ``[full_lo, full_hi)``: the whole of ``[lo, hi)`` when its visible keys are contiguous (right or
    left padding), else nothing (each block in ``[lo, hi)`` is then walked masked). A few reductions
    on the device: the kernels read the numbers, the host never does.
    """
    row = mask.expand(mask.shape[0], 1, 1, seqlen_k)[:, 0, 0, :]
    keys = torch.arange(seqlen_k, device=mask.device, dtype=torch.int32)
    lo = torch.where(row, keys, seqlen_k).amin(dim=1)
    hi = torch.maximum(torch.where(row, keys + 1, 0).amax(dim=1), lo)
    contiguous = row.sum(dim=1, dtype=torch.int32) == hi - lo
    return torch.stack((lo, hi, lo, torch.where(contiguous, hi, lo)), dim=1).to(torch.int32).contiguous()
