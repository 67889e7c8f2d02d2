"""Ring attention: exact attention over a sequence sharded across the ranks of a process group."""

from __future__ import annotations

import itertools
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from flash.distributed._comm import ProcessGroupRing
from flash.distributed._ring import Packed, RingAttention, RingConfig
from flash.distributed.sharding import Sharding, check_divisible, check_sharding, chunks_per_rank, packed_lengths
from flash.errors import InvalidInputError
from flash.spec import KERNEL_DTYPES, REFERENCE_DTYPES, AttentionSpec, build_spec, check_argument_types


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = ...,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    layout: Literal["bshd", "bhsd"] = ...,
    sharding: Sharding = ...,
    deterministic: bool = ...,
    backend: str = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = ...,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    layout: Literal["bshd", "bhsd"] = ...,
    sharding: Sharding = ...,
    deterministic: bool = ...,
    backend: str = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    layout: Literal["bshd", "bhsd"] = "bshd",
    sharding: Sharding = "zigzag",
    deterministic: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of one sequence whose tokens are sharded across the ranks of ``group``.

    Every rank of the group calls it with its shard of q, k and v (from
    :func:`~flash.distributed.shard`, or laid out the same way) and the same options. The result is
    the rank's shard of what :func:`flash.attention` would return on the whole sequence: the keys
    of every rank are seen, through the ring.

    Args:
        q, k, v: this rank's shards, (batch, seqlen / W, heads, head_dim) (``layout="bhsd"``:
            (batch, heads, seqlen / W, head_dim)); q and k/v have the same shard length, k/v may
            have fewer heads (GQA/MQA). float16, bfloat16, float32 or float64.
        group: the process group whose ranks hold the shards, in rank order; default the world.
            Its backend carries the K/V (NCCL for CUDA tensors, gloo for CPU tensors).
        causal, window, softcap, scale: as :func:`flash.attention`, with positions in the *full*
            sequence (query ``i`` sees keys ``i - left <= j <= i + right``).
        layout: ``"bshd"`` or ``"bhsd"``.
        sharding: how the sequence was cut: ``"zigzag"`` (balanced causal work, the default) or
            ``"contiguous"``; see :mod:`flash.distributed.sharding`.
        deterministic: bit-identical results run to run (the ring itself always runs in a fixed
            order; this asks the per-block kernels for deterministic gradients too).
        backend: backend of the per-block attention calls, dispatched as usual.
        return_lse: also return this rank's rows' LSE over the full sequence, (batch, heads_q,
            seqlen / W), float32 (float64 for float64 inputs).

    Returns:
        The output shard, shaped like ``q`` (and the LSE). Differentiable in q, k, v: the backward
        runs the ring again.

    Raises:
        InvalidInputError: naming the argument, before any communication: options out of the
            spec, q and k shards of different lengths, a zig-zag shard of odd length, fp8 inputs,
            no initialised process group.
    """
    check_argument_types(
        q=q, k=k, v=v, causal=causal, softcap=softcap, scale=scale, layout=layout, return_lse=return_lse,
        deterministic=deterministic, backend=backend,
    )  # fmt: skip
    sharding = check_sharding(sharding)
    spec = build_spec(
        q, k, v, layout=layout, causal=causal, window=window, softcap=softcap, scale=scale, deterministic=deterministic
    )
    _check_shards(spec, q)
    check_divisible("q", spec.seqlen_q, chunks_per_rank(sharding), f"a shard length ({sharding} sharding)")
    _check_group()
    config = RingConfig(
        sharding=sharding,
        bounds=spec.mask_bounds,
        softcap=spec.softcap,
        scale=spec.scale,
        deterministic=deterministic,
        backend=backend,
    )
    out, lse = RingAttention.apply(q, k, v, layout, config, ProcessGroupRing(group))
    return (out, lse) if return_lse else out


def _check_shards(spec: AttentionSpec, q: Tensor) -> None:
    if spec.dtype not in KERNEL_DTYPES + REFERENCE_DTYPES:
        raise InvalidInputError("q", "float16, bfloat16, float32 or float64 (fp8 has no backward)", str(q.dtype))
    if spec.total_k != spec.total_q:
        raise InvalidInputError(
            "k", f"a shard of {spec.total_q} tokens like q (one sequence, sharded the same way)", str(spec.total_k)
        )


def _check_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("group", "a process group (call torch.distributed.init_process_group)", "none")


@overload
def ring_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    max_seqlen: int | None = ...,
    group: dist.ProcessGroup | None = ...,
    causal: bool = ...,
    softcap: float = ...,
    scale: float | None = ...,
    sharding: Sharding = ...,
    deterministic: bool = ...,
    backend: str = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def ring_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    max_seqlen: int | None = ...,
    group: dist.ProcessGroup | None = ...,
    causal: bool = ...,
    softcap: float = ...,
    scale: float | None = ...,
    sharding: Sharding = ...,
    deterministic: bool = ...,
    backend: str = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def ring_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    max_seqlen: int | None = None,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softcap: float = 0.0,
    scale: float | None = None,
    sharding: Sharding = "zigzag",
    deterministic: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Ring attention of a packed batch of sequences, every sequence sharded across the ranks.

    Each rank holds its :func:`~flash.distributed.shard_varlen` piece of the packed batch; each
    sequence attends only to itself, as in :func:`flash.attention` with ``cu_seqlens``.

    Args:
        q, k, v: this rank's packed tokens, (total / W, heads, head_dim) (k/v may have fewer heads).
        cu_seqlens: int32 offsets of the *whole* packed batch (batch + 1, the same on every rank), on
            q's device. Every sequence's length must be a multiple of ``2 * W`` (zig-zag) or ``W``
            (contiguous). Read once on the host, to check it.
        max_seqlen: the longest sequence of the whole batch; read from ``cu_seqlens`` if omitted.
        group, causal, softcap, scale, sharding, deterministic, backend: as :func:`ring_attention`.
            There is no ``window``: sequences of different lengths cut into the same number of chunks
            put a window's edge in different chunk pairs.
        return_lse: also return the LSE, (heads_q, total / W), float32 (float64 for float64 inputs).

    Returns:
        This rank's output tokens, shaped like ``q`` (and the LSE). Differentiable in q, k, v.
    """
    check_argument_types(
        q=q, k=k, v=v, causal=causal, softcap=softcap, scale=scale, return_lse=return_lse,
        deterministic=deterministic, backend=backend,
    )  # fmt: skip
    sharding = check_sharding(sharding)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise InvalidInputError("max_seqlen", "an int or None", repr(max_seqlen))
    _check_group()
    world_size = dist.get_world_size(group)
    chunks = world_size * chunks_per_rank(sharding)
    offsets = packed_lengths(cu_seqlens, chunks)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device:
        expected = f"an int32 tensor on {q.device} (like q)"
        raise InvalidInputError("cu_seqlens", expected, f"{cu_seqlens.dtype} on {cu_seqlens.device}")
    if q.dim() == 3 and offsets[-1] != world_size * q.shape[0]:
        expected = f"a last offset of world size x q's tokens = {world_size * q.shape[0]}"
        raise InvalidInputError("cu_seqlens", expected, str(offsets[-1]))
    longest = max((b - a for a, b in itertools.pairwise(offsets)), default=0)
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise InvalidInputError("max_seqlen", f"at least the longest sequence ({longest})", str(max_seqlen))
    # Every region of every shard is the same packed batch shape: that chunk of each sequence.
    packed = Packed(cu_seqlens.div(chunks, rounding_mode="floor").to(torch.int32), max_seqlen // chunks)
    region = q.shape[0] // chunks_per_rank(sharding) if q.dim() == 3 else 0
    spec = build_spec(
        q[:region], k[:region], v[:region], causal=causal, softcap=softcap, scale=scale, deterministic=deterministic,
        cu_seqlens_q=packed.cu_seqlens, cu_seqlens_k=packed.cu_seqlens, max_seqlen_q=packed.max_seqlen,
        max_seqlen_k=packed.max_seqlen,
    )  # fmt: skip
    _check_shards(spec, q)
    if k.shape[0] != q.shape[0]:
        raise InvalidInputError(
            "k", f"{q.shape[0]} tokens like q (the same sequences, sharded the same way)", str(k.shape[0])
        )
    config = RingConfig(
        sharding=sharding,
        bounds=spec.mask_bounds,
        softcap=spec.softcap,
        scale=spec.scale,
        deterministic=deterministic,
        backend=backend,
        packed=packed,
    )
    out, lse = RingAttention.apply(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), "bshd", config, ProcessGroupRing(group)
    )
    return (out[0], lse[0]) if return_lse else out[0]
