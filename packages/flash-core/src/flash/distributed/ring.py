"""Ring attention: exact attention over a sequence sharded across the ranks of a process group."""

from __future__ import annotations

from typing import Literal, overload

import torch.distributed as dist
from torch import Tensor

from flash.distributed._comm import ProcessGroupRing
from flash.distributed._ring import RingAttention, RingConfig
from flash.distributed.sharding import Sharding, check_divisible, check_sharding, chunks_per_rank
from flash.errors import InvalidInputError
from flash.spec import KERNEL_DTYPES, REFERENCE_DTYPES, build_spec, check_argument_types


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
    if spec.dtype not in KERNEL_DTYPES + REFERENCE_DTYPES:
        raise InvalidInputError("q", "float16, bfloat16, float32 or float64 (fp8 has no backward)", str(q.dtype))
    if spec.seqlen_k != spec.seqlen_q:
        raise InvalidInputError(
            "k", f"a shard of {spec.seqlen_q} tokens like q (one sequence, sharded the same way)", str(spec.seqlen_k)
        )
    check_divisible("q", spec.seqlen_q, chunks_per_rank(sharding), f"a shard length ({sharding} sharding)")
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("group", "a process group (call torch.distributed.init_process_group)", "none")
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
