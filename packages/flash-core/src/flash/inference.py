"""The KV-cache call: attention of a few new tokens against a cache of keys and values."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from flash import dispatch
from flash.errors import InvalidInputError
from flash.kvplan import CallOptions, CallTensors, plan_for_kvcache, run_decode, spec_of
from flash.kvspec import check_cache_values, check_length, checks_enabled


@overload
def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = ...,
    v: Tensor | None = ...,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = ...,
    cache_batch_idx: Tensor | None = ...,
    rotary_cos: Tensor | None = ...,
    rotary_sin: Tensor | None = ...,
    rotary_interleaved: bool = ...,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    sinks: Tensor | None = ...,
    sink_tokens: int = ...,
    num_splits: int | None = ...,
    k_descale: Tensor | None = ...,
    v_descale: Tensor | None = ...,
    return_lse: Literal[False] = ...,
    check_values: bool | None = ...,
    backend: str = ...,
) -> Tensor: ...
@overload
def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = ...,
    v: Tensor | None = ...,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = ...,
    cache_batch_idx: Tensor | None = ...,
    rotary_cos: Tensor | None = ...,
    rotary_sin: Tensor | None = ...,
    rotary_interleaved: bool = ...,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    sinks: Tensor | None = ...,
    sink_tokens: int = ...,
    num_splits: int | None = ...,
    k_descale: Tensor | None = ...,
    v_descale: Tensor | None = ...,
    return_lse: Literal[True],
    check_values: bool | None = ...,
    backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    rotary_interleaved: bool = False,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    num_splits: int | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    return_lse: bool = False,
    check_values: bool | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of new queries against a KV cache, appending new keys and values to it first.

    Sequence ``b`` holds ``cache_seqlens[b]`` keys before the call. If ``k`` and ``v`` are given,
    they are written *in place* into the cache at positions ``cache_seqlens[b] ..
    cache_seqlens[b] + seqlen_new - 1`` (rotated first if rotary tables are given), and the queries
    attend to all ``cache_seqlens[b] + seqlen_new`` keys. ``cache_seqlens`` itself is not updated.

    Args:
        q: new queries, (batch, seqlen_q, heads_q, head_dim), fp16, bf16, fp32 or fp64.
        k_cache, v_cache: the caches: contiguous (batch, capacity, heads_kv, head_dim) (or
            (cache_batch, ...) with ``cache_batch_idx``), or paged (num_pages, page_size, heads_kv,
            head_dim) with ``block_table``, page_size 1 to 256. Same dtype as ``q``, or fp8
            (e4m3/e5m2) with ``k_descale``/``v_descale``.
        k, v: new keys and values to append, (batch, seqlen_new, heads_kv, head_dim), dtype of ``q``;
            an fp8 cache stores ``k / k_descale`` rounded to nearest.
        cache_seqlens: keys already cached per sequence: an int32 (batch,) tensor (or one int for
            every sequence; a tensor is what a CUDA graph can replay with new values).
        block_table: int32 (batch, max_pages): the pages of each sequence, in order.
        cache_batch_idx: int32 (batch,): the cache row of each sequence (contiguous caches).
        rotary_cos, rotary_sin: (positions, rotary_dim / 2) tables (float32 or q's dtype): the new
            keys at their positions and the queries at theirs (bottom-right aligned:
            ``cache_seqlens[b] + seqlen_new - seqlen_q + i``) are rotated (:mod:`flash.rotary`).
        rotary_interleaved: rotate pairs ``(2m, 2m + 1)`` (GPT-J) instead of ``(m, m + rotary_dim / 2)``.
        causal: query ``i`` sees cache positions ``<= cache_seqlens[b] + seqlen_new - seqlen_q + i``
            (with ``seqlen_new == seqlen_q``: the new tokens see each other causally).
        window: ``(left, right)`` sliding window, bottom-right aligned as :func:`flash.attention`'s.
        softcap, scale: as :func:`flash.attention`.
        sinks: float32 (heads_q,) sink logits, as :func:`flash.attention`'s.
        sink_tokens: the first ``sink_tokens`` cache positions stay visible beyond the window (StreamingLLM).
        num_splits: parts the keys of each sequence are split into (split-KV, merged exactly as
            :func:`flash.merge_states` merges); ``None`` picks a count that fills the GPU
            (:func:`flash.heuristics.decode.num_splits`), 1 turns splitting off.
        k_descale, v_descale: float32 dequantisation factors of an fp8 cache: shape () per tensor,
            (heads_kv,) per head or (batch, heads_kv).
        return_lse: also return the LSE, float32 (batch, heads_q, seqlen_q).
        check_values: check ``cache_seqlens``, ``block_table`` and ``cache_batch_idx`` values (a
            device-to-host copy on a GPU). ``None``: only where that costs no synchronisation (CPU
            tensors); never while a CUDA graph is captured. Unchecked values are clamped as
            :mod:`flash.kvspec` documents: never an access outside the tensors.
        backend: ``"auto"`` or the name of a backend to force.

    Returns:
        The output, shaped like ``q`` (and the LSE if ``return_lse``). Inference only: inputs
        that require grad are refused (call it under ``torch.no_grad()`` or ``torch.inference_mode()``).
    """
    if return_lse is not True and return_lse is not False:
        raise InvalidInputError("return_lse", "a bool", repr(return_lse))
    if torch.is_grad_enabled():
        named = (("q", q), ("k", k), ("v", v), ("sinks", sinks), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin))
        for name, t in named:
            if getattr(t, "requires_grad", False):
                expected = "a tensor that does not require grad (inference only: use torch.no_grad())"
                raise InvalidInputError(name, expected, "requires_grad=True")
    tensors = CallTensors(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, rotary_cos,
                          rotary_sin, sinks, k_descale, v_descale)  # fmt: skip
    options = CallOptions(rotary_interleaved, causal, window, softcap, scale, sink_tokens, num_splits)
    plan = plan_for_kvcache(tensors, options, backend)
    spec = plan.spec
    if isinstance(cache_seqlens, Tensor):
        lengths = cache_seqlens
    else:  # its value belongs to this call: checked each time (no tensor to copy)
        check_length(cache_seqlens, spec.capacity, spec.seqlen_new)
        lengths = torch.full((spec.batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if checks_enabled(q.device, check_values):
        check_cache_values(spec, lengths, block_table, cache_batch_idx)
    out, lse = run_decode(plan, tensors, lengths)
    return (out, lse) if return_lse else out


def explain_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    rotary_interleaved: bool = False,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    num_splits: int | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    return_lse: bool = False,
    check_values: bool | None = None,
    backend: str = "auto",
) -> dispatch.KVCacheExplanation:
    """Which backend would run this :func:`attention_with_kvcache` call, and why each other backend
    would not; the problem line shows the split count. Same arguments; runs nothing, writes nothing."""
    del return_lse, check_values  # neither changes who computes it
    tensors = CallTensors(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, rotary_cos,
                          rotary_sin, sinks, k_descale, v_descale)  # fmt: skip
    spec = spec_of(tensors, CallOptions(rotary_interleaved, causal, window, softcap, scale, sink_tokens, num_splits))
    return dispatch.explain_kvcache(spec, backend)
