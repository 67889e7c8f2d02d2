"""Host side of the KV-cache kernels: arguments, grids and the split workspace.

Everything here reads the spec and tensor metadata only (shapes, strides, pointers), never a tensor
value, so a decoding step launches without synchronising and can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flash.backend import DecodeArgs
from flash.heuristics import KernelConfig
from flash.kvspec import KVCacheSpec
from flash.spec import UNBOUNDED
from flash_triton import replay, runtime
from flash_triton.launch import LOG2E, descale_strides, padded_head_dim, triton_cdiv

#: Fewest rows a program's tile has (what ``tl.dot`` needs).
MIN_ROWS = 16


def _strides(t: torch.Tensor | None, count: int) -> tuple[int, ...]:
    return tuple(t.stride()[:count]) if t is not None else (0,) * count


def row_block(spec: KVCacheSpec, config: KernelConfig) -> int:
    """Rows of a program's tile: the GQA group times the new tokens, padded to a power of two of at
    least 16, at most the configuration's ``block_m`` (more rows take several programs)."""
    rows = spec.group_size * spec.seqlen_q
    return max(MIN_ROWS, min(1 << max(rows - 1, 0).bit_length(), config.block_m))


def warps(spec: KVCacheSpec, config: KernelConfig) -> int:
    """Warps of the decoding kernel: the configuration's, or its ``multi_token_warps`` for several new
    tokens (more rows, and the NaN-safe products of masked tiles, need more registers)."""
    if spec.seqlen_q > 1:
        return int(config.option("multi_token_warps", config.num_warps))
    return config.num_warps


def page_constant(spec: KVCacheSpec, config: KernelConfig) -> int:
    """The decoding kernel's ``PAGE``: a paged cache's page size where it is a power of two (a tile's
    keys share their page numbers' reads and their slots are fixed by their place in the tile), else
    0 (each key divides its position by the page size and reads its own page number; on an H200 the
    per-key path ran pages of 16 and 64 at +22-23% over the contiguous time, the per-tile one at
    -2 to +2%)."""
    size = spec.page_size
    if not spec.paged or size & (size - 1):
        return 0
    return size


def stages(spec: KVCacheSpec, config: KernelConfig) -> int:
    """Pipeline stages of the decoding kernel: the configuration's, or its ``paged_num_stages`` for a
    paged cache (a load that takes its address from the block table's load is scheduled a stage
    later, so the same depth of K/V tiles in flight needs more stages)."""
    if spec.paged:
        return int(config.option("paged_num_stages", config.num_stages))
    return config.num_stages


class Workspace(NamedTuple):
    """Buffers a step allocates besides its outputs (None where unused): the rotated queries, and the
    split parts' outputs and LSEs. Sizes are fixed by the spec: the same every step of a batch
    composition (a CUDA graph's pool keeps them)."""

    q_in: torch.Tensor | None
    parts: torch.Tensor | None
    lse_parts: torch.Tensor | None


def workspace(spec: KVCacheSpec, q: torch.Tensor) -> Workspace:
    q_in = torch.empty(q.shape, dtype=q.dtype, device=q.device) if spec.rotary != "none" else None
    if spec.num_splits <= 1 or not spec.seqlen_q:
        return Workspace(q_in, None, None)
    splits, batch, rows, heads = spec.num_splits, spec.batch, spec.seqlen_q, spec.heads_q
    parts = torch.empty((splits, batch, rows, heads, spec.head_dim), dtype=torch.float32, device=q.device)
    lse_parts = torch.empty((splits, batch, heads, rows), dtype=torch.float32, device=q.device)
    return Workspace(q_in, parts, lse_parts)


def decode(spec: KVCacheSpec, args: DecodeArgs, config: KernelConfig) -> None:
    """Append, then fill ``args.out`` and ``args.lse``. After a signature's first step, the step's
    launches replay (:mod:`flash_triton.replay`): a decoding loop's host time is mostly launch code."""
    work = workspace(spec, args.q)
    tensors: replay.Tensors = (
        args.q, args.k_cache, args.v_cache, args.cache_seqlens, args.out, args.lse, args.k, args.v, args.block_table,
        args.cache_batch_idx, args.rotary_cos, args.rotary_sin, args.sinks, args.k_descale, args.v_descale, *work,
    )  # fmt: skip
    key = replay.signature("decode", (spec, config), tensors) if replay.enabled() else None
    recorded = replay.find(key)
    if recorded is not None:
        replay.replay(recorded, tensors)
        return
    recorder = replay.Recorder(key, tensors)
    _decode(spec, args, config, work, recorder)
    recorder.keep((spec, config), None)


def _decode(
    spec: KVCacheSpec, args: DecodeArgs, config: KernelConfig, work: Workspace, recorder: replay.Recorder
) -> None:
    kern = runtime.kernels().decode
    d_pad = padded_head_dim(spec.head_dim)
    q = args.q
    table_strides = _strides(args.block_table, 2)
    index_stride = _strides(args.cache_batch_idx, 1)[0]
    k_desc, v_desc = descale_strides(args.k_descale), descale_strides(args.v_descale)
    cache_k, cache_v = _strides(args.k_cache, 3), _strides(args.v_cache, 3)
    rotary = spec.rotary != "none"
    if rotary or spec.seqlen_new:
        q_in = work.q_in if work.q_in is not None else q
        tokens = max(spec.seqlen_q if rotary else 0, spec.seqlen_new)
        heads = spec.heads_q if rotary else spec.heads_kv
        recorder.run(
            kern.kv_append_kernel, (tokens, heads, spec.batch),
            q, q_in, args.k, args.v, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table,
            args.cache_batch_idx, args.rotary_cos, args.rotary_sin, args.k_descale, args.v_descale,
            *_strides(q, 3), *_strides(q_in, 3), *_strides(args.k, 3), *_strides(args.v, 3), *cache_k, *cache_v,
            *table_strides, index_stride, *_strides(args.rotary_cos, 1), *_strides(args.rotary_sin, 1),
            *k_desc, *v_desc,
            spec.seqlen_q, spec.seqlen_new, spec.heads_kv, spec.capacity, spec.page_size, spec.pages,
            spec.rotary_positions,
            HEAD_DIM=spec.head_dim, D_PAD=d_pad, HALF=max(spec.rotary_dim // 2, 1), ROTARY=rotary,
            INTERLEAVED=spec.rotary == "interleaved", ROTATE_Q=rotary, APPEND=spec.seqlen_new > 0,
            PAGED=spec.paged, BATCH_IDX=spec.batch_idx, DESCALE=args.k_descale is not None, num_warps=1,
        )  # fmt: skip
        q = q_in
    if not spec.seqlen_q:
        return
    out, lse, splits = args.out, args.lse, spec.num_splits
    parts, lse_parts = work.parts, work.lse_parts
    block_m = row_block(spec, config)
    row_blocks = triton_cdiv(spec.group_size * spec.seqlen_q, block_m)
    left, right = spec.mask_bounds
    recorder.run(
        kern.kv_decode_kernel, (splits, spec.heads_kv * row_blocks, spec.batch),
        q, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table, args.cache_batch_idx, args.sinks,
        args.k_descale, args.v_descale, out, lse, parts, lse_parts,
        *_strides(q, 3), *cache_k, *cache_v, *table_strides, index_stride, *k_desc, *v_desc,
        *_strides(out, 3), *_strides(lse, 3), *_strides(parts, 4), *_strides(lse_parts, 4),
        spec.seqlen_q, spec.seqlen_new, spec.group_size, row_blocks, spec.capacity, spec.page_size, spec.pages,
        max(left, 0), max(right, 0), spec.sink_tokens, spec.scale * LOG2E,
        spec.scale / spec.softcap if spec.softcap else 0.0, spec.softcap * LOG2E,
        HEAD_DIM=spec.head_dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=config.block_n, NUM_SPLITS=splits,
        PAGED=spec.paged, PAGE=page_constant(spec, config), BATCH_IDX=spec.batch_idx, HAS_LEFT=left != UNBOUNDED,
        HAS_RIGHT=right != UNBOUNDED, SOFTCAP=spec.softcap > 0, SINKS=spec.sinks, DESCALE=args.k_descale is not None,
        MULTI_TOKEN=spec.seqlen_q > 1, num_warps=warps(spec, config), num_stages=stages(spec, config),
    )  # fmt: skip
    if splits > 1:
        recorder.run(
            kern.kv_combine_kernel, (spec.seqlen_q, spec.heads_q, spec.batch),
            parts, lse_parts, args.sinks, out, lse,
            *_strides(parts, 4), *_strides(lse_parts, 4), *_strides(out, 3), *_strides(lse, 3),
            HEAD_DIM=spec.head_dim, D_PAD=d_pad, NUM_SPLITS=splits, SPLITS_PAD=1 << (splits - 1).bit_length(),
            SINKS=spec.sinks, num_warps=1,
        )  # fmt: skip
