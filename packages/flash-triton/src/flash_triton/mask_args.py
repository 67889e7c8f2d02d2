"""Host side of the masks: the kernel arguments of a call's attn_mask, ALiBi, block lists and mods.

Block lists come from the call's :class:`flash.BlockMask`, or, for a dense boolean ``attn_mask``,
from :func:`flash.block_mask.block_states` run on it per call (one torch reduction over the mask,
with the launch's own tile as the block).
A key-padding mask (one row for every query and head, shape (batch|1, 1, 1, seqlen_k)) needs no
block lists: :func:`flash.masking.key_runs` summarises each sequence's row in four numbers on the device (no host
sync), and the kernels clip their dense walk to them (``KEY_RUNS``): key blocks outside the visible
keys are never loaded, the blocks inside a run of visible keys are walked unmasked, as the
variable-length path would, without packing the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from flash.backend import MaskTensors
from flash.block_mask import BlockLists, block_lists, block_states
from flash.masking import key_runs, made_once
from flash.spec import AttentionSpec
from flash.support import device_capability

Walk = Literal["keys", "queries"]  # which axis a kernel walks: forward and dQ walk keys, dK/dV queries


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


@dataclass(frozen=True)
class MaskArgs:
    """Pointers, strides and constexprs of one launch (dummies where a feature is off)."""

    mask: torch.Tensor
    m_str: tuple[int, ...]  # (batch, head, query, key), 0 where broadcast
    alibi: torch.Tensor
    a_str: tuple[int, ...]  # (batch, head)
    counts: torch.Tensor
    indices: torch.Tensor
    c_str: tuple[int, ...]  # (batch, head, row)
    i_str: tuple[int, ...]  # (batch, head, row, list length)
    runs: torch.Tensor  # (batch|1, 4) int32 of :func:`key_runs`, or a dummy
    r_str: int  # batch stride of ``runs``, 0 where broadcast
    flags: dict[str, Any] = field(default_factory=dict)

    def pointers(self) -> tuple[torch.Tensor, ...]:
        return self.mask, self.alibi, self.counts, self.indices, self.runs

    def strides(self) -> tuple[Any, ...]:
        return self.m_str, self.a_str, self.c_str, self.i_str, self.r_str


#: A block mask whose visited blocks are at least this much partial has V checked once per forward.
CHECK_VALUES_PARTIAL_SHARE = 0.1


def _checked_tile_fits(spec: AttentionSpec) -> bool:
    """Hopper (or the interpreter) at head dims to 128: where the per-tile check and the V-checked walk
    compile well for sm_90 (Triton 3.6: d128 forward 50 -> 10 ldl/stl); at d256 and on sm_80 they spill
    more than the always-guarded product (sm_90 d256 540 -> 1612, sm_80 d64 94 -> 677) and the checked
    walk's second set of buffers passes 227 KB of shared memory at d256."""
    capability = device_capability(spec.device)
    return (capability is None or capability >= (9, 0)) and spec.head_dim <= 128


def tile_guard(spec: AttentionSpec) -> int:
    """The forward's ``TILE_GUARD``: 1, masked tiles check their V and guard only a non-finite one; 2,
    they always take the guarded product (see :func:`_checked_tile_fits`)."""
    return 1 if _checked_tile_fits(spec) else 2


def checks_values(spec: AttentionSpec, masks: MaskTensors | None) -> bool:
    """Whether a forward checks V for NaN and inf once (one reduction over V on the device) so that its
    masked tiles can skip the per-tile guard (:func:`flash_triton.tiles.visible_dot`): worth it where
    masked tiles are many, a block mask with many partial blocks (document masks: half), a dense
    boolean mask, a ``mask_mod`` on every tile; not for a few diagonal or boundary tiles."""
    if spec.is_fp8 or not _checked_tile_fits(spec):
        return False
    if masks is not None and masks.block_mask is not None:
        return masks.block_mask.partial_share >= CHECK_VALUES_PARTIAL_SHARE
    dense_bool = spec.mask is not None and spec.mask.kind == "bool" and not spec.key_padding
    return spec.mask_mod is not None or dense_bool


def values_finite(v: torch.Tensor) -> torch.Tensor:
    """A uint8 scalar on v's device, 1 iff ``v`` holds no NaN or inf: the sum of a NaN or inf is one (a
    finite sum that overflows only costs the guard). One read of v, no host sync."""
    return torch.isfinite(v.sum(dtype=torch.float32)).view(torch.uint8)


def sparse_block(spec: AttentionSpec, masks: MaskTensors | None) -> tuple[int, int] | None:
    """The (rows, cols) block size of the call's block mask, if it has one."""
    if masks is not None and masks.block_mask is not None:
        return masks.block_mask.block_size
    return None


def fit_tiling(tiling: Any, spec: AttentionSpec, masks: MaskTensors | None, walk: Walk) -> Any:
    """``tiling`` with tiles no larger than the block mask's blocks (kernel tiles must divide them).

    The dK/dV kernel with an additive mask keeps 2 stages: its float32 mask tiles would take it past
    Hopper's 227 KB of shared memory with 3 (scripts/compile_report.py --masks).
    """
    if walk == "queries" and spec.mask is not None and spec.mask.kind == "bias":
        tiling = replace(tiling, num_stages=min(tiling.num_stages, 2))
    block = sparse_block(spec, masks)
    if block is None:
        return tiling
    rows, cols = block
    return replace(tiling, block_m=min(tiling.block_m, rows), block_n=min(tiling.block_n, cols))


def _lists(spec: AttentionSpec, masks: MaskTensors, block_m: int, block_n: int) -> tuple[BlockLists, int, int] | None:
    """(block lists, block rows, block cols) of the call, or None when it walks without lists."""
    if masks.block_mask is not None:
        rows, cols = masks.block_mask.block_size
        return masks.block_mask.lists, rows, cols
    if spec.mask is not None and spec.mask.kind == "bool" and masks.attn_mask is not None and not spec.key_padding:
        states = block_states(masks.attn_mask, spec.seqlen_q, spec.seqlen_k, (block_m, block_n))
        return block_lists(states, spec.seqlen_q, block_m), block_m, block_n
    return None


def _dims(t: torch.Tensor, leading: int) -> tuple[int, ...]:
    """Strides of the first ``leading`` axes (0 where broadcast), then the length of the last axis."""
    return (*_broadcast_strides(t)[:leading], t.shape[-1])


def mask_args(
    spec: AttentionSpec,
    masks: MaskTensors | None,
    tiling: Any,
    walk: Walk,
    dummy: torch.Tensor,
    translate: Any,
) -> MaskArgs:
    """The kernel arguments of ``spec``'s masks for one launch of ``tiling`` walking ``walk``.

    ``translate(fn, argument)`` turns a user function into its Triton device function.
    """
    masks = masks or MaskTensors()
    block = masks.block_mask
    dense = masks.attn_mask if masks.attn_mask is not None else (block.dense if block is not None else None)
    mask_kind = 0 if dense is None else (2 if dense.dtype != torch.bool else 1)
    mask = dummy if dense is None else (dense.view(torch.uint8) if dense.dtype == torch.bool else dense)
    m_str: tuple[int, ...] = (0, 0, 0, 0) if dense is None else _broadcast_strides(dense)
    if mask_kind == 1 and spec.key_padding:
        mask_kind = 4  # one row for every query: the kernels load a vector of keys, not a tile
    documents = block.document_ids if block is not None else None
    intervals = block.key_intervals if block is not None else None
    if intervals is not None:  # (B|1, 2, Sq): each query's interval of keys, the mask's own bounds folded in
        mask_kind, mask = 5, intervals
        m_str = (_broadcast_strides(intervals)[0], 0, 1, intervals.stride(1))
    elif documents is not None:  # (B|1, S) ids: the same vector is the query's and the key's axis
        mask_kind, mask = 3, documents
        m_str = (_broadcast_strides(documents)[0], 0, 1, 1)
    alibi = masks.alibi_slopes
    a_str = (
        (0, 0) if alibi is None else ((alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0)))
    )
    # The intervals are the whole mask (a document mask's causal bound too): its mask_mod would test again.
    block_mod = block.mask_mod if block is not None and intervals is None else None
    mask_mod = spec.mask_mod if spec.mask_mod is not None else block_mod
    lists = _lists(spec, masks, tiling.block_m, tiling.block_n)
    padding = spec.key_padding and masks.attn_mask is not None
    runs = made_once(key_runs, masks.attn_mask, spec.seqlen_k) if padding and masks.attn_mask is not None else dummy
    r_str = runs.stride(0) if padding and runs.shape[0] > 1 else 0
    flags: dict[str, Any] = {
        "TERMS": spec.score_terms or spec.softcap > 0,
        "ALIBI": alibi is not None,
        "MASK": mask_kind,
        "SCORE_MOD": translate(spec.score_mod, "score_mod"),
        "MASK_MOD": translate(mask_mod, "mask_mod"),
        "ELEMENTWISE": spec.mask_mod is not None,
        "SPARSE": lists is not None,
        "KEY_RUNS": padding,
    }
    if lists is None:
        flags.update(SPARSE_FIXED=1, SPARSE_WALK=1)
        return MaskArgs(mask, m_str, alibi if alibi is not None else dummy, a_str, dummy, dummy, (0, 0, 0),
                        (0, 0, 0, 0), runs, r_str, flags)  # fmt: skip
    found, rows, cols = lists
    if walk == "keys":
        counts, indices = found.kv_counts, found.kv_indices
        flags.update(SPARSE_FIXED=rows, SPARSE_WALK=cols)
    else:
        counts, indices = found.q_counts, found.q_indices
        flags.update(SPARSE_FIXED=cols, SPARSE_WALK=rows)
    c_str, i_str = _dims(counts, 3)[:3], _dims(indices, 3)
    return MaskArgs(mask, m_str, alibi if alibi is not None else dummy, a_str, counts, indices, c_str, i_str, runs,
                    r_str, flags)  # fmt: skip
