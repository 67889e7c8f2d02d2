"""The ring loops: forward with exact LSE merging, backward by recomputation, and their autograd.

Forward, on every rank, for ``step = 0 .. W-1`` (rank ``r`` holds the K/V shard of rank
``r - step``): post the transfer of the K/V in hand to the next rank, run the step's attention
calls (:mod:`flash.distributed._plan`) on it while the transfer runs, merge each result into a
running (out, lse) by :func:`flash.merge.combine`, then wait for the next K/V.

Backward, the same ring again: each rank recomputes every call's gradient from the *final*
output and LSE of its rows, keeps dQ, and adds its dK/dV share for the K/V in hand to an
accumulator that travels the ring one step behind the K/V and ends at that K/V's owner. K/V
travel the ring a second time rather than being kept from the forward, so no rank ever holds
more than two K/V shards at once.

Everything runs in a fixed order (the plan's call order, ring order, a fixed summation order
of dK/dV): the result does not depend on timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from flash.distributed._blocks import block_backward, block_forward
from flash.distributed._comm import Ring
from flash.distributed._plan import Block, packed_step_blocks, step_blocks
from flash.distributed.sharding import Sharding
from flash.merge import combine


@dataclass(frozen=True)
class Packed:
    """A packed batch: the offsets and longest sequence shared by every region of every shard."""

    cu_seqlens: Tensor  # int32, on the tensors' device
    max_seqlen: int


@dataclass(frozen=True)
class RingConfig:
    """What every rank of one ring attention call agrees on."""

    sharding: Sharding
    bounds: tuple[int, int]  # global (left, right) reach; right 0 for causal, -1 unbounded
    softcap: float
    scale: float
    deterministic: bool
    backend: str
    packed: Packed | None = None  # tensors are then (1, tokens, heads, head_dim)

    def blocks(self, ring: Ring, step: int, length: int) -> tuple[Block, ...]:
        source = (ring.rank - step) % ring.world_size
        plan = step_blocks if self.packed is None else packed_step_blocks
        return plan(ring.world_size, ring.rank, source, self.sharding, length, self.bounds)

    def options(self, block: Block) -> dict[str, Any]:
        causal, window = block.options
        return {
            "causal": causal,
            "window": window,
            "softcap": self.softcap,
            "scale": self.scale,
            "deterministic": self.deterministic,
            "backend": self.backend,
            "cu_seqlens": None if self.packed is None else self.packed.cu_seqlens,
            "max_seqlen": None if self.packed is None else self.packed.max_seqlen,
        }


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results are merged and summed in float32, in float64 for float32 and float64 inputs: a
    float32 sum of float32 parts over the ring's steps adds roundings that one call does not make
    (enough to break the 2x-naive-error rule for dK of MQA, where each part already sums many heads)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The returned LSE's dtype: float32, float64 for float64 inputs (what a single call returns)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(q: Tensor, k: Tensor, v: Tensor, config: RingConfig, ring: Ring) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of this rank's queries over the whole ring's keys, in the accumulator dtype.

    ``q``, ``k``, ``v`` are canonical (batch, seqlen, heads, head_dim); ``k`` and ``v`` contiguous
    (they are sent as they are).
    """
    acc = accumulator_dtype(q.dtype)
    batch, length, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, length), float("-inf"), dtype=acc, device=q.device)
    rows_lse = lse.transpose(1, 2)  # (batch, seqlen, heads): aligned with out's rows
    held = [k, v]
    for step in range(ring.world_size):
        incoming = ring.exchange(held) if step + 1 < ring.world_size else None  # overlaps the compute below
        for block in config.blocks(ring, step, length):
            rows, cols = slice(*block.rows), slice(*block.cols)
            part_out, part_lse = block_forward(q[:, rows], held[0][:, cols], held[1][:, cols], **config.options(block))
            merged_out, merged_lse = combine([out[:, rows], part_out], [rows_lse[:, rows], part_lse.transpose(1, 2)])
            out[:, rows] = merged_out
            rows_lse[:, rows] = merged_lse
        if incoming is not None:
            held = incoming.wait()
    return out, lse


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, config: RingConfig, ring: Ring
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of this rank's shards, canonical, in the accumulator dtype.

    ``out`` and ``lse`` are the final (merged) forward results of this rank's rows.
    """
    acc = accumulator_dtype(q.dtype)
    length = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    held = [k, v]
    travelling = None  # the dK/dV accumulator of the K/V held one step ago, on its way here
    for step in range(ring.world_size):
        incoming = ring.exchange(held) if step + 1 < ring.world_size else None
        dkv = torch.zeros((2, *k.shape), dtype=acc, device=k.device)  # this rank's share for the K/V in hand
        for block in config.blocks(ring, step, length):
            rows, cols = slice(*block.rows), slice(*block.cols)
            dq_part, dk_part, dv_part = block_backward(
                dout[:, rows],
                q[:, rows],
                held[0][:, cols],
                held[1][:, cols],
                out[:, rows],
                lse[:, :, rows],
                **config.options(block),
            )
            dq[:, rows] += dq_part
            dkv[0, :, cols] += dk_part
            dkv[1, :, cols] += dv_part
        if travelling is not None:
            dkv += travelling.wait()[0]  # the shares of the ranks this K/V visited before
        if ring.world_size > 1:
            travelling = ring.exchange([dkv])  # after the last step, to the K/V's owner
        if incoming is not None:
            held = incoming.wait()
    if travelling is not None:
        dkv = travelling.wait()[0]  # this rank's own K/V, with every rank's share
    return dq, dkv[0], dkv[1]  # (W = 1: the one step's share is the whole gradient)


def _canonical(t: Tensor, layout: str) -> Tensor:
    return t if layout == "bshd" else t.transpose(1, 2)


class RingAttention(torch.autograd.Function):
    """Autograd of the ring: inputs and outputs in the caller's layout; returns ``(out, lse)``."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, layout: str, config: RingConfig, ring: Ring
    ) -> tuple[Tensor, Tensor]:
        qc = _canonical(q, layout)
        kc, vc = _canonical(k, layout).contiguous(), _canonical(v, layout).contiguous()
        out, lse = ring_forward(qc, kc, vc, config, ring)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kc, vc, out, lse)
        ctx.layout, ctx.config, ctx.ring = layout, config, ring
        returned_lse = lse.to(lse_dtype(q.dtype))
        ctx.mark_non_differentiable(returned_lse)
        return _canonical(out, layout), returned_lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, kc, vc, out, lse = ctx.saved_tensors
        qc = _canonical(q, ctx.layout)
        dq, dk, dv = ring_backward(_canonical(dout, ctx.layout), qc, kc, vc, out, lse, ctx.config, ctx.ring)
        grads = (_canonical(g.to(q.dtype), ctx.layout) for g in (dq, dk, dv))
        return (*grads, None, None, None)
