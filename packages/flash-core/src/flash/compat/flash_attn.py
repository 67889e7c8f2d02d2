"""flash-attn 2.x's public functions, computed by :func:`flash.attention`.

Same names, argument names, order and defaults as ``flash_attn.flash_attn_interface``, and the
same conventions: ``(batch, seqlen, heads, head_dim)`` tensors (``(total, heads, head_dim)`` with
``cu_seqlens``), causal masks and windows aligned to the bottom-right corner,
``window_size=(-1, -1)`` for no window, and ``causal=True`` clamping the window's right side to 0.
So ``import flash.compat.flash_attn as fa`` and ``fa.flash_attn_func(q, k, v, causal=True)``
work as with flash-attn, on any flash backend (and on the CPU).

Where flash-attn's behaviour cannot be reproduced the call raises, never approximates:

* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``. flash-attn fills
  ``S_dmask`` only when ``dropout_p > 0`` (its kernels return an empty tensor otherwise), so
  with ``dropout_p == 0`` the result here is ``(out, lse, empty tensor)`` as there; with dropout,
  where the caller would expect the dropped probabilities, :class:`NotImplementedError`;
* ``alibi_slopes`` in :func:`flash_attn_with_kvcache` (the decoding path has no ALiBi yet; the
  other functions take it, as :func:`flash.attention` does): :class:`NotImplementedError`;
* ``block_table`` (paged KV cache) in the varlen functions: :class:`NotImplementedError` (use
  :func:`flash_attn_with_kvcache`, which takes paged caches); ``cache_leftpad`` in
  :func:`flash_attn_with_kvcache`, and the rotary query placements where flash-attn and flash differ
  (see the function).

Differences: dropout draws a seed from PyTorch's default generator (``torch.manual_seed``
reproduces it), and its mask differs from flash-attn's (each is a valid Bernoulli mask, see
:mod:`flash.dropout`); ``softcap`` must be >= 0 (flash-attn treats negative values as 0); inputs may
also be float32 or float64 (they run on the reference backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

import flash
from flash.dropout import random_seed
from flash.errors import InvalidInputError
from flash.spec import check_window

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

Result = Tensor | tuple[Tensor, Tensor, Tensor]


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    return_attn_probs: bool,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> Result:
    """flash-attn's conventions mapped onto :func:`flash.attention` (whose ALiBi is flash-attn's:
    ``-slope * |i + seqlen_k - seqlen_q - j|``, slopes (heads,) or (batch, heads), float32)."""
    if return_attn_probs and dropout_p:
        raise NotImplementedError(
            "return_attn_probs with dropout_p > 0: flash never materialises the (dropped) attention probabilities"
        )
    left, right = check_window(tuple(window_size) if isinstance(window_size, list) else window_size, "window_size")
    if causal:  # flash-attn sets the right side to 0 under causal, whatever window_size says; causal does that here
        right = -1
    window = None if (left, right) == (-1, -1) else (left, right)
    numeric = isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool)
    out, lse = flash.attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=softmax_scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p,
        dropout_seed=random_seed() if numeric and dropout_p > 0 else None,
        return_lse=True,
        deterministic=deterministic,
        alibi_slopes=alibi_slopes,
    )
    if return_attn_probs:  # flash-attn's S_dmask is empty when there is no dropout
        return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)
    return out


def _split(name: str, packed: Tensor, count: int, varlen: bool) -> tuple[Tensor, ...]:
    """Views of a packed (…, count, heads, head_dim) tensor; no copy."""
    want = 4 if varlen else 5
    words = f"(total, {count}, heads, head_dim)" if varlen else f"(batch, seqlen, {count}, heads, head_dim)"
    if not isinstance(packed, Tensor):
        raise InvalidInputError(name, f"a tensor {words}", type(packed).__name__)
    if packed.dim() != want or packed.shape[-3] != count:
        raise InvalidInputError(name, f"shape {words}", f"shape {tuple(packed.shape)}")
    return packed.unbind(dim=-3)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Result:
    """Attention of ``q`` (batch, seqlen_q, heads, head_dim) over ``k``, ``v`` (batch, seqlen_k,
    heads_kv, head_dim); heads a multiple of heads_kv. Returns ``out`` like ``q``, or
    ``(out, softmax_lse (batch, heads, seqlen_q), empty)`` with ``return_attn_probs``."""
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Result:
    """:func:`flash_attn_func` of ``qkv`` (batch, seqlen, 3, heads, head_dim); gradients flow into ``qkv``."""
    q, k, v = _split("qkv", qkv, 3, varlen=False)
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Result:
    """:func:`flash_attn_func` with ``kv`` (batch, seqlen_k, 2, heads_kv, head_dim)."""
    k, v = _split("kv", kv, 2, varlen=False)
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
) -> Result:
    """Attention of a packed batch: ``q`` (total_q, heads, head_dim), ``k``, ``v`` (total_k,
    heads_kv, head_dim), int32 offsets ``cu_seqlens_q/k`` (batch + 1). Masks apply per sequence.
    ``softmax_lse`` is (heads, total_q). ``block_table`` (a paged prefill) is not supported; paged
    caches go through :func:`flash_attn_with_kvcache`."""
    if block_table is not None:
        raise NotImplementedError(
            "block_table: flash has no paged varlen prefill; flash_attn_with_kvcache takes paged caches"
        )
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Result:
    """:func:`flash_attn_varlen_func` of ``qkv`` (total, 3, heads, head_dim), one ``cu_seqlens`` for all three."""
    q, k, v = _split("qkv", qkv, 3, varlen=True)
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Result:
    """:func:`flash_attn_varlen_func` with ``kv`` (total_k, 2, heads_kv, head_dim)."""
    k, v = _split("kv", kv, 2, varlen=True)
    return _attend(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention against a KV cache, appending ``k``/``v`` in place first: :func:`flash.attention_with_kvcache`
    with flash-attn's argument names, order and defaults (``rotary_interleaved=True``,
    ``num_splits=0`` for automatic, ``cache_seqlens=None`` for a full cache).

    Rotary embeddings follow flash-attn: only with ``k`` and ``v``, and the new queries sit at the
    positions of the new keys. Where flash-attn places queries differently from flash's bottom-right
    rule (a non-causal, unwindowed call with several queries puts them all at ``cache_seqlens``; a
    call with as many queries as new keys is the same in both), this raises
    :class:`NotImplementedError`, as do ``cache_leftpad`` and ``alibi_slopes``."""
    if alibi_slopes is not None:
        raise NotImplementedError(
            "alibi_slopes: flash.attention_with_kvcache has no ALiBi yet (flash_attn_func has); pass alibi_slopes=None"
        )
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: flash's caches start at slot 0; pass cache_leftpad=None")
    left, right = check_window(tuple(window_size) if isinstance(window_size, list) else window_size, "window_size")
    if causal:  # flash-attn sets the right side to 0 under causal, whatever window_size says; causal does that here
        right = -1
    window = None if (left, right) == (-1, -1) else (left, right)
    if rotary_cos is not None:
        if k is None:
            raise InvalidInputError(
                "rotary_cos", "None unless k and v are given (flash-attn rotates new keys)", "a tensor"
            )
        local = causal or window is not None
        if k.shape[1] != q.shape[1] and (local or q.shape[1] > 1):
            raise NotImplementedError(
                "rotary with a different number of queries and new keys: flash-attn's query positions "
                "differ from flash's bottom-right ones there"
            )
        if not local and q.shape[1] > 1:
            raise NotImplementedError(
                "rotary without causal or window and several queries: flash-attn rotates them all at "
                "cache_seqlens; flash at their own positions"
            )
    if cache_seqlens is None:  # flash-attn reads the whole cache
        full = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        cache_seqlens = full - (k.shape[1] if k is not None else 0)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise InvalidInputError("num_splits", "an int >= 0 (0: automatic)", repr(num_splits))
    out, lse = flash.attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, causal=causal, window=window, softcap=softcap, scale=softmax_scale,
        num_splits=num_splits or None, return_lse=True,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out
