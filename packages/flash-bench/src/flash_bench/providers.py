"""What the benchmarks time: a flash backend or a peer, as ``run(q, k, v, causal) -> out`` on
(batch, seqlen, heads, head_dim) tensors. PyTorch's attention takes (batch, heads, seqlen,
head_dim); the transposes are views, so no provider copies its inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

import flash

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]

#: Peers the attention section times by default.
PEERS = ("sdpa-flash", "sdpa-cudnn", "flex")
#: PyTorch SDPA, by provider name: which of its kernels (None: its own choice).
SDPA_KERNELS = {
    "sdpa": None,
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-mem-efficient": "EFFICIENT_ATTENTION",
}
#: Every peer a benchmark can name.
KNOWN_PEERS = (*SDPA_KERNELS, "flex")


def sdpa_context(kind: str) -> contextlib.AbstractContextManager[Any]:
    """The context that makes SDPA use the kernel of provider ``kind`` (nothing for plain ``sdpa``)."""
    kernel = SDPA_KERNELS[kind]
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, kernel))


def sdpa_bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """PyTorch's attention on (batch, heads, seqlen, head_dim) tensors."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa(kind: str) -> Provider:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_context(kind):
            return sdpa_bhsd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)

    return run


#: Compilations of one function torch.compile keeps before it gives up and runs it eagerly.
FLEX_RECOMPILE_LIMIT = 256


def compiled_flex_attention() -> Callable[..., Any]:
    """``torch.compile(flex_attention)`` that stays compiled over every case of a benchmark run.

    Every shape, mask and score function is one more compilation of the same function; past
    dynamo's recompile limit (8 by default) FlexAttention would silently run unfused and eagerly,
    hundreds of times slower, and be timed as such.
    """
    from torch.nn.attention.flex_attention import flex_attention

    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, FLEX_RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _flex() -> Provider:
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = compiled_flex_attention()
    masks: dict[tuple[int, int], Any] = {}

    def causal_mask(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx >= kv_idx

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        block_mask = None
        if causal:
            key = (q.shape[1], k.shape[1])
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, None, None, q.shape[1], k.shape[1], device=q.device)
            block_mask = masks[key]
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def _flash(backend: str) -> Provider:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        return flash.attention(q, k, v, causal=causal, backend=backend)

    return run


def provider(name: str) -> Provider:
    """The provider called ``name``: a peer of :data:`KNOWN_PEERS`, else a flash backend."""
    if name in SDPA_KERNELS:
        return _sdpa(name)
    if name == "flex":
        return _flex()
    return _flash(name)
