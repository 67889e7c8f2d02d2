"""The reference KV-cache pass: append, then split-KV attention merged exactly, in pure torch.

It is written with whole-tensor operations only, so it never reads a value on the host: it runs
under a CUDA graph and makes no assumption about ``cache_seqlens`` beyond the documented clamp
(:mod:`flash.kvspec`). Each sequence's keys are gathered over the whole capacity and masked
(:func:`flash.masking.cache_mask`): slots past a sequence's length are hidden, and hidden slots
contribute nothing, not even a NaN. The keys are cut into ``spec.num_splits`` parts, each part's
output and LSE computed alone, and the parts merged by :func:`flash.merge.combine`, the math of
:func:`flash.merge_states` and of every backend's combine step; a sink logit joins the merge as
one more part, with output 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flash.backend import DecodeArgs
from flash.kvspec import KVCacheSpec
from flash.masking import cache_mask, visible_matmul
from flash.merge import combine
from flash.rotary import rotate


def compute_dtype(spec: KVCacheSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.float64 else torch.float32


def lengths(spec: KVCacheSpec, cache_seqlens: Tensor) -> Tensor:
    """Keys each sequence holds before the call, clamped so that the new keys fit (int64)."""
    return cache_seqlens.to(torch.int64).clamp(0, spec.capacity - spec.seqlen_new)


def slots(spec: KVCacheSpec, args: DecodeArgs, positions: Tensor) -> tuple[Tensor, Tensor]:
    """(page, slot) of key ``positions`` (batch, n) of each sequence, page numbers clamped into the pool."""
    batch = positions.shape[0]
    if args.block_table is not None:
        index = (positions // spec.page_size).clamp(max=args.block_table.shape[1] - 1)
        page = args.block_table.to(torch.int64).gather(1, index)
        return page.clamp(0, spec.pages - 1), positions % spec.page_size
    if args.cache_batch_idx is not None:
        rows = args.cache_batch_idx.to(torch.int64).clamp(0, spec.pages - 1)
    else:
        rows = torch.arange(batch, device=positions.device)
    return rows[:, None].expand_as(positions), positions


def descale_factor(spec: KVCacheSpec, d: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A (batch, 1, heads_kv, 1) view of per-tensor, per-head or per-(sequence, head) factors."""
    if d is None:
        return None
    d = d.to(dtype)
    if d.dim() == 2:
        return d[:, None, :, None]
    return d.reshape(1, 1, -1, 1)


def _rotary_positions(spec: KVCacheSpec, base: Tensor, count: int) -> Tensor:
    positions = base[:, None] + torch.arange(count, device=base.device)[None, :]
    return positions.clamp(0, max(spec.rotary_positions - 1, 0))


def append(spec: KVCacheSpec, args: DecodeArgs, length: Tensor) -> None:
    """Write the new keys (rotated) and values at positions ``length .. length + seqlen_new - 1``."""
    if args.k is None or args.v is None or not spec.seqlen_new:
        return
    cd = compute_dtype(spec)
    positions = length[:, None] + torch.arange(spec.seqlen_new, device=length.device)[None, :]
    k, v = args.k.to(cd), args.v.to(cd)
    if spec.rotary != "none":
        assert args.rotary_cos is not None and args.rotary_sin is not None
        where = _rotary_positions(spec, length, spec.seqlen_new)
        k = rotate(args.k, args.rotary_cos, args.rotary_sin, where, spec.rotary == "interleaved", cd)
    k_scale = descale_factor(spec, args.k_descale, cd)
    v_scale = descale_factor(spec, args.v_descale, cd)
    if k_scale is not None and v_scale is not None:  # an fp8 cache stores value / descale
        k, v = k / k_scale, v / v_scale
    page, slot = slots(spec, args, positions)
    args.k_cache[page, slot] = k.to(spec.cache_dtype)
    args.v_cache[page, slot] = v.to(spec.cache_dtype)


def _part(s: Tensor, v: Tensor, seen: Tensor) -> tuple[Tensor, Tensor]:
    """Output and LSE of scores ``s`` (..., rows, keys) over the keys ``seen`` says each row sees."""
    s = s.masked_fill(~seen, float("-inf"))
    top = s.amax(dim=-1)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    p = torch.exp(s - shift[..., None])
    total = p.sum(dim=-1)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    out = visible_matmul(p / safe[..., None], v, seen, fast_path=False)  # never a host sync
    lse = torch.where(empty, torch.full_like(total, float("-inf")), torch.log(safe) + shift)
    return out, lse


def attend(spec: KVCacheSpec, args: DecodeArgs, length: Tensor, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """Attention of the (rotated) queries over the cache after the append, computed in ``cd``:
    ``(out, lse)`` as (batch, heads_kv, group, seqlen_q, head_dim) and (batch, heads_kv, group, seqlen_q)."""
    batch, group, capacity = spec.batch, spec.group_size, spec.capacity
    q = args.q
    if spec.rotary != "none":
        assert args.rotary_cos is not None and args.rotary_sin is not None
        where = _rotary_positions(spec, length + spec.seqlen_new - spec.seqlen_q, spec.seqlen_q)
        q = rotate(q, args.rotary_cos, args.rotary_sin, where, spec.rotary == "interleaved")
    q = q.to(cd).unflatten(2, (spec.heads_kv, group)).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Sq, D)
    page, slot = slots(spec, args, torch.arange(capacity, device=q.device)[None, :].expand(batch, -1))
    k, v = args.k_cache[page, slot].to(cd), args.v_cache[page, slot].to(cd)  # (B, C, Hkv, D)
    k_scale, v_scale = descale_factor(spec, args.k_descale, cd), descale_factor(spec, args.v_descale, cd)
    if k_scale is not None and v_scale is not None:
        k, v = k * k_scale, v * v_scale
    k, v = k.permute(0, 2, 1, 3)[:, :, None], v.permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, C, D)
    s = torch.matmul(q, k.transpose(-1, -2)) * spec.scale
    if spec.softcap:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    seen = cache_mask(length + spec.seqlen_new, spec.seqlen_q, capacity, spec.mask_bounds, spec.sink_tokens)
    seen = seen[:, None, None]  # (B, 1, 1, Sq, C)
    chunk = max(1, -(-capacity // spec.num_splits))
    parts = [_part(s[..., j : j + chunk], v[..., j : j + chunk, :], seen[..., j : j + chunk])
             for j in range(0, capacity, chunk)]  # fmt: skip
    outs, lses = [o for o, _ in parts], [lse for _, lse in parts]
    rows = (batch, spec.heads_kv, group, spec.seqlen_q)
    if args.sinks is not None:  # a part with the sink's logit as LSE and output 0
        outs.append(q.new_zeros((*rows, spec.head_dim)))
        lses.append(args.sinks.to(cd).view(1, spec.heads_kv, group, 1).expand(rows))
    if not outs:  # a cache with no room at all
        outs.append(q.new_zeros((*rows, spec.head_dim)))
        lses.append(q.new_full(rows, float("-inf")))
    return combine(outs, lses)


def decode(spec: KVCacheSpec, args: DecodeArgs) -> None:
    """Append, then fill ``args.out`` and ``args.lse``."""
    length = lengths(spec, args.cache_seqlens)
    append(spec, args, length)
    if not spec.seqlen_q:
        return
    out, lse = attend(spec, args, length, compute_dtype(spec))
    args.out.copy_(out.permute(0, 3, 1, 2, 4).flatten(2, 3))
    args.lse.copy_(lse.flatten(1, 2))
