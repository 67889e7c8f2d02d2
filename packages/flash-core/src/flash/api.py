"""The public attention functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from flash import dispatch, dropout, ops
from flash.backend import Backend
from flash.block_mask import BlockMask
from flash.errors import InvalidInputError
from flash.plan import CallMasks, call_masks, plan_for, run_forward
from flash.registry import REGISTRY, BackendInfo
from flash.spec import FP8_DTYPES, build_spec, check_argument_types, check_window

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    layout: Literal["bshd", "bhsd"] = ...,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_q: int | None = ...,
    max_seqlen_k: int | None = ...,
    dropout_p: float = ...,
    dropout_seed: int | None = ...,
    q_descale: Tensor | None = ...,
    k_descale: Tensor | None = ...,
    v_descale: Tensor | None = ...,
    out_dtype: torch.dtype | None = ...,
    sinks: Tensor | None = ...,
    sink_tokens: int = ...,
    return_lse: Literal[False] = ...,
    deterministic: bool = ...,
    check_values: bool | None = ...,
    attn_mask: Tensor | None = ...,
    alibi_slopes: Tensor | None = ...,
    block_mask: BlockMask | None = ...,
    score_mod: ScoreMod | None = ...,
    score_mod_grad: ScoreMod | None = ...,
    mask_mod: MaskMod | None = ...,
    backend: str = ...,
) -> Tensor: ...
@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = ...,
    window: tuple[int, int] | None = ...,
    softcap: float = ...,
    scale: float | None = ...,
    layout: Literal["bshd", "bhsd"] = ...,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_q: int | None = ...,
    max_seqlen_k: int | None = ...,
    dropout_p: float = ...,
    dropout_seed: int | None = ...,
    q_descale: Tensor | None = ...,
    k_descale: Tensor | None = ...,
    v_descale: Tensor | None = ...,
    out_dtype: torch.dtype | None = ...,
    sinks: Tensor | None = ...,
    sink_tokens: int = ...,
    return_lse: Literal[True],
    deterministic: bool = ...,
    check_values: bool | None = ...,
    attn_mask: Tensor | None = ...,
    alibi_slopes: Tensor | None = ...,
    block_mask: BlockMask | None = ...,
    score_mod: ScoreMod | None = ...,
    score_mod_grad: ScoreMod | None = ...,
    mask_mod: MaskMod | None = ...,
    backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    layout: Literal["bshd", "bhsd"] = "bshd",
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    check_values: bool | None = None,
    attn_mask: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    block_mask: BlockMask | None = None,
    score_mod: ScoreMod | None = None,
    score_mod_grad: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale * q k^T) v``, computed the FlashAttention way.

    Args:
        q: queries, (batch, seqlen_q, heads_q, head_dim); (batch, heads_q, seqlen_q, head_dim) with
            ``layout="bhsd"``; (total_q, heads_q, head_dim) for a variable-length batch.
        k, v: keys and values, shaped like ``q`` with seqlen_k and heads_kv; heads_q must be a multiple
            of heads_kv (GQA/MQA, K/V are never repeated in memory).
        causal: causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k: query ``i``
            sees keys ``j <= i + seqlen_k - seqlen_q``.
        window: ``(left, right)`` sliding window: query ``i`` sees keys
            ``i + off - left <= j <= i + off + right`` (``off = seqlen_k - seqlen_q``); -1 is unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(head_dim)``.
        layout: ``"bshd"`` (default) or ``"bhsd"`` (PyTorch's SDPA layout).
        cu_seqlens_q, cu_seqlens_k: int32 offsets (batch + 1) of the sequences of a packed batch.
        max_seqlen_q, max_seqlen_k: longest sequences of a packed batch; read from the offsets if
            omitted (a device-to-host copy: pass them under ``torch.compile`` or CUDA graphs).
        dropout_p: probability of dropping an attention weight (training).
        dropout_seed: required when ``dropout_p > 0``; the mask is a pure function of
            (seed, sequence, head, query, key), see :mod:`flash.dropout`.
        q_descale, k_descale, v_descale: float32 dequantisation factors of fp8 inputs, shape ``()``
            per tensor or (batch, heads) per head (:func:`flash.fp8.quantize_qkv` makes them); fp8
            attention is inference-only (inputs that require grad are refused).
        out_dtype: the output's dtype. ``None`` (default): the inputs' own, bf16 for fp8 inputs. fp8
            inputs may ask for ``torch.bfloat16`` or ``torch.float16`` (fp8 outputs are not
            supported); other inputs only for their own dtype. A backend that cannot store the
            dtype asked for is not chosen (:func:`flash.explain` says so).
        sinks: learned per-head sink logits, float32 (heads_q,): each adds ``exp(sinks[h])`` to the
            softmax denominator of every row of head ``h`` (and to its LSE) without a value, so
            the row's weights sum to less than one (gpt-oss). Differentiable (:mod:`flash.sinks`).
        sink_tokens: the first ``sink_tokens`` keys stay visible beyond a window's left reach
            (StreamingLLM); causality still applies. No effect without a bounded left reach.
        return_lse: also return the log-sum-exp of each row, float32 (batch, heads_q, seqlen_q)
            ((heads_q, total_q) for varlen); -inf for a row that sees no key (whose output is 0),
            the sink's logit for such a row with ``sinks``.
        deterministic: ask for bit-identical gradients run to run.
        check_values: check the values of ``cu_seqlens_q/k`` (a device-to-host copy when they are on
            a GPU). ``None`` (default): only where that costs no synchronisation, i.e. offsets in CPU
            memory; kernels clamp every offset they read either way.
        attn_mask: a dense mask broadcastable to (batch, heads_q, seqlen_q, seqlen_k) (2 to 4 dims, any
            axis of size 1), whatever the layout: boolean (True: the query sees the key) or float (added
            to the scores; differentiable). Not with varlen or ``block_mask``.
        alibi_slopes: float32 (heads_q,) or (batch, heads_q): ALiBi, ``-slope * |i + seqlen_k - seqlen_q - j|``
            added to the score of query ``i`` and key ``j`` (flash-attn's definition).
        block_mask: a :class:`flash.BlockMask` built once for these sizes: only its visited blocks are
            computed, and its mask applies.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, applied to every score after
            softcap, ALiBi and an additive mask (contract: :mod:`flash.mods`).
        score_mod_grad: ``d score_mod / d score`` with the same signature, for kernel backward passes.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True where the query sees the key. Alone it is
            evaluated on every tile; a ``block_mask`` built from it skips the hidden ones.
        backend: ``"auto"`` or the name of a backend to force.

    Every mask combines with the others (a key is seen only if each mask lets it through); see
    :mod:`flash.terms` for the order of the score terms.

    Returns:
        The output, shaped like ``q`` (and the LSE if ``return_lse``). Differentiable in q, k, v, ``sinks``
        (and an additive ``attn_mask`` that requires grad).
    """
    return _attention(
        q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, layout=layout, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
        dropout_seed=dropout_seed, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        out_dtype=out_dtype, sinks=sinks, sink_tokens=sink_tokens,
        return_lse=return_lse, deterministic=deterministic, check_values=check_values, attn_mask=attn_mask,
        alibi_slopes=alibi_slopes, block_mask=block_mask, score_mod=score_mod, score_mod_grad=score_mod_grad,
        mask_mod=mask_mod, backend=backend,
    )  # fmt: skip


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    layout: Literal["bshd", "bhsd"] = "bshd",
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    check_values: bool | None = None,
    attn_mask: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    block_mask: BlockMask | None = None,
    score_mod: ScoreMod | None = None,
    score_mod_grad: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`attention` without its overloads (what the other entry points call)."""
    if return_lse is not True and return_lse is not False:
        raise InvalidInputError("return_lse", "a bool", repr(return_lse))
    window = None if window is None else check_window(window)
    if torch.compiler.is_compiling():  # the plan path checks the other types once per call signature
        check_argument_types(
            q=q, k=k, v=v, causal=causal, softcap=softcap, scale=scale, layout=layout, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
            dropout_seed=dropout_seed, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            deterministic=deterministic, check_values=check_values, backend=backend, sinks=sinks,
            sink_tokens=sink_tokens, out_dtype=out_dtype,
        )  # fmt: skip
    grad = _needs_grad(q, k, v, sinks)
    if grad and q.dtype in FP8_DTYPES:
        raise InvalidInputError(
            "q", "tensors that do not require grad (fp8 attention has no backward)", "requires_grad"
        )
    if not dropout_p:
        dropout_seed = None
    masks = call_masks(attn_mask, alibi_slopes, block_mask, score_mod, score_mod_grad, mask_mod)
    if torch.compiler.is_compiling():
        _no_masks_when_compiling(masks)
        left, right = window or (-1, -1)
        out, lse = ops.attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale, k_descale, v_descale,
            out_dtype, sinks, layout, causal, left, right, softcap, scale, dropout_p, dropout_seed, deterministic,
            backend, sink_tokens,
        )  # fmt: skip
    else:
        plan, spec = plan_for(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale, k_descale, v_descale, layout,
            causal, window, softcap, scale, dropout_p, dropout_seed, deterministic, backend, check_values, masks,
            sinks, sink_tokens, out_dtype,
        )  # fmt: skip
        if grad or (spec.mask is not None and spec.mask.requires_grad):
            out, lse = ops.AttentionFunction.apply(
                q, k, v, plan, spec, cu_seqlens_q, cu_seqlens_k, attn_mask, masks, sinks
            )
        else:
            out, lse = run_forward(
                plan, spec, q, k, v, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale, masks, sinks
            )
    return (out, lse) if return_lse else out


def _no_masks_when_compiling(masks: CallMasks) -> None:
    """The torch.compile ops take no mask options yet: say so rather than drop them."""
    for name, value in masks.options().items():
        if value is not None:
            raise InvalidInputError(
                name, "None under torch.compile (mask options run eagerly only, for now)", "a value"
            )


def attention_qkvpacked(
    qkv: Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    check_values: bool | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a packed projection: ``qkv`` is (batch, seqlen, 3, heads, head_dim), or
    (total, 3, heads, head_dim) with ``cu_seqlens`` (and ``max_seqlen``). Options as :func:`attention`.

    The three slices are views of ``qkv``: nothing is copied.
    """
    if not isinstance(qkv, Tensor):
        raise InvalidInputError("qkv", "a torch.Tensor", type(qkv).__name__)
    axis = qkv.dim() - 3
    if qkv.dim() not in (4, 5) or qkv.shape[axis] != 3:
        raise InvalidInputError(
            "qkv", "shape (batch, seqlen, 3, heads, head_dim) or (total, 3, heads, head_dim)", f"{tuple(qkv.shape)}"
        )
    q, k, v = qkv.unbind(dim=axis)
    return _attention(
        q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, dropout_p=dropout_p,
        dropout_seed=dropout_seed, sinks=sinks, sink_tokens=sink_tokens, return_lse=return_lse,
        deterministic=deterministic, check_values=check_values, backend=backend,
    )  # fmt: skip


# Captured at import: a caller may install this module's function in its place.
_torch_sdpa = torch.nn.functional.scaled_dot_product_attention


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """A drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Same signature, layout (..., heads, seqlen, head_dim) and semantics, including PyTorch's
    *top-left* causal mask (query ``i`` sees keys ``j <= i``). Everything runs through
    :func:`attention`: an ``attn_mask`` (boolean, True: take part; or float, added) on the kernels
    (a boolean one skips the tiles it hides, a padding mask of shape (batch, 1, 1, seqlen_k) the
    padded key blocks), top-left causal as the spec's causal mask or window, or as a mask function
    when there are fewer queries than keys. Only two cases still run PyTorch's own
    implementation: value and query head dims that differ (or exceed 256), and ``attn_mask``
    together with ``is_causal`` (PyTorch raises its own error) or with more than 4 query dims.

    Rows that see no key give 0 where PyTorch gives NaN. Dropout draws its seed from PyTorch's
    default generator; its mask differs from PyTorch's (each is a valid Bernoulli mask).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)
        if t.dim() < 3:
            raise InvalidInputError(name, "a tensor of at least 3 dims (..., seqlen, head_dim)", f"{t.dim()}-D")
    q_len, k_len = query.shape[-2], key.shape[-2]
    expressible = query.dim() == key.dim() == value.dim() and value.shape[-1] == query.shape[-1] <= 256
    if attn_mask is not None:
        expressible = expressible and not is_causal and query.dim() <= 4
    if not expressible:
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    if not enable_gqa and query.shape[-3] != key.shape[-3]:
        raise InvalidInputError(
            "key", f"{query.shape[-3]} heads like query (or enable_gqa=True)", f"{key.shape[-3]} heads"
        )
    if query.dim() == 3:  # (batch, seqlen, dim) is one head
        q4, k4, v4 = (t.unsqueeze(1) for t in (query, key, value))
        if attn_mask is not None and attn_mask.dim() == 3:  # (batch, sq, sk): the head axis goes in between
            attn_mask = attn_mask.unsqueeze(1)
    else:  # fold any leading dims into the batch
        q4, k4, v4 = (t.reshape((-1, *tuple(t.shape[-3:]))) for t in (query, key, value))
    window = (-1, q_len - k_len) if is_causal and q_len > k_len else None
    top_left = _top_left_causal if is_causal and q_len < k_len else None
    seed = dropout.random_seed() if dropout_p else None
    out = attention(
        q4,
        k4,
        v4,
        layout="bhsd",
        causal=is_causal and window is None and top_left is None,
        window=window,
        scale=scale,
        dropout_p=dropout_p,
        dropout_seed=seed,
        attn_mask=attn_mask,
        mask_mod=top_left,
    )
    assert isinstance(out, Tensor)
    return out.squeeze(1) if query.dim() == 3 else out.reshape(query.shape[:-1] + out.shape[-1:])


def _top_left_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """PyTorch's causal mask (aligned top-left) where flash's bottom-right one differs."""
    return kv_idx <= q_idx


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    layout: Literal["bshd", "bhsd"] = "bshd",
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    return_lse: bool = False,
    deterministic: bool = False,
    check_values: bool | None = None,
    attn_mask: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    block_mask: BlockMask | None = None,
    score_mod: ScoreMod | None = None,
    score_mod_grad: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    backend: str = "auto",
) -> dispatch.Explanation:
    """Which backend would run the forward and the backward of this call, and why each other
    backend would not. Takes the same arguments as :func:`attention`; runs nothing.
    ``print(flash.explain(...))`` shows it."""
    del return_lse  # what is returned does not change who computes it
    spec = build_spec(
        q, k, v, causal=causal, window=window, softcap=softcap, scale=scale, layout=layout,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p, dropout_seed=dropout_seed, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, out_dtype=out_dtype, deterministic=deterministic, check_values=check_values,
        attn_mask=attn_mask, alibi_slopes=alibi_slopes, block_mask=block_mask, score_mod=score_mod,
        score_mod_grad=score_mod_grad, mask_mod=mask_mod, sinks=sinks, sink_tokens=sink_tokens,
    )  # fmt: skip
    return dispatch.explain(spec, backend)


def backends() -> list[BackendInfo]:
    """Every installed backend: version, package, priority, and whether it is usable here (and why not).

    An entry point whose name another distribution already owns is listed too, as unusable."""
    infos = [REGISTRY.info(name) for name in REGISTRY.by_priority() + _unloadable()]
    return infos + REGISTRY.shadowed_infos()


def _unloadable() -> list[str]:
    ordered = set(REGISTRY.by_priority())
    return [name for name in REGISTRY.names() if name not in ordered]


def register_backend(backend: Backend) -> None:
    """Register a backend object in this process, as if an installed package had declared it in the
    ``flash.backends`` entry-point group. Raises :class:`flash.errors.BackendError` if it speaks
    another plugin API."""
    REGISTRY.register(backend)


def set_backend_priority(name: str, priority: int | None) -> None:
    """Override backend ``name``'s dispatch priority for this process; ``None`` restores its own."""
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise InvalidInputError("priority", "an int or None", repr(priority))
    REGISTRY.get(name)  # fail now, with the reason, if there is no such backend
    REGISTRY.set_priority(name, priority)
