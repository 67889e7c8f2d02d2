"""The attention function registered with transformers' ``AttentionInterface``.

transformers calls it from every attention layer with ``query`` (batch, heads, q_len, head_dim),
``key``/``value`` (batch, heads_kv, k_len, head_dim) (K/V already include the KV cache) and the mask
that :func:`.mask.padding_mask` built. It picks one of three ways to call :func:`flash.attention`:

* ``"padded"``: a 2-D padding mask: the real tokens are packed (:mod:`flash.padding`), attended as a
  variable-length batch and scattered back; padded query rows come back as zeros;
* ``"packed"``: no mask, but ``cu_seq_lens_q/k`` or position ids that restart inside a row say the
  batch holds several sequences end to end: attended as a variable-length batch;
* ``"dense"``: otherwise.

Causal masks are bottom-right aligned, which is transformers' causal mask whenever the keys end at
the last query: prefill, decoding with a cache (q_len 1, k_len past + 1) and, after packing, left or
right padding. transformers' ``sliding_window`` ``w`` lets query ``i`` see keys ``i - w < j <= i``
when causal (flash window ``(w - 1, 0)``) and ``|i - j| <= w`` otherwise (``(w, w)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import flash
from flash.dropout import random_seed
from flash.errors import InvalidInputError
from flash.padding import cu_seqlens_from_position_ids, select_tokens, unpad_indices

Path = Literal["dense", "padded", "packed"]

#: Keyword arguments some transformers models pass that change the math flash computes.
_UNSUPPORTED = {
    "position_bias": "position_bias (an additive score bias, as in T5)",
    "indices": "indices (sparse attention)",
    "block_indices": "block_indices (block-sparse attention)",
}


@dataclass(frozen=True)
class CallRecord:
    """One call of the attention function, as :func:`record_calls` saw it."""

    layer_idx: int | None
    path: Path
    forward_backend: str | None  #: the flash backend dispatch chose for the forward
    backward_backend: str | None  #: ... and for the backward


_recording: list[list[CallRecord]] = []


@contextlib.contextmanager
def record_calls() -> Iterator[list[CallRecord]]:
    """Record every call of the attention function inside the ``with`` block: the path it took
    and the backends :func:`flash.explain` says run it (so a test can assert that every layer ran on
    flash, on the expected backend). Recording costs a dispatch decision per call."""
    calls: list[CallRecord] = []
    _recording.append(calls)
    try:
        yield calls
    finally:
        _recording.remove(calls)


def _window(sliding_window: object, causal: bool) -> tuple[int, int] | None:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise InvalidInputError("sliding_window", "None or a positive int", repr(sliding_window))
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _as_int(name: str, value: object) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return int(value.item())
    raise InvalidInputError(name, "an int or a one-element tensor", type(value).__name__)


def _is_packed(position_ids: Tensor | None, q_len: int, k_len: int) -> bool:
    """Position ids that restart inside a row mean several sequences share it. Only without a cache
    (q_len == k_len), as transformers' own masks read them. Waits for the device once."""
    if position_ids is None or position_ids.dim() > 2 or q_len != k_len or position_ids.shape[-1] != q_len or q_len < 2:
        return False  # 3-D (multimodal RoPE) position ids do not signal packing
    return bool((position_ids[..., 1:] != position_ids[..., :-1] + 1).any())


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_ids: Tensor | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | Tensor | None = None,
    max_length_k: int | Tensor | None = None,
    deterministic: bool = False,
    s_aux: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention for a transformers layer; returns ``(output (batch, q_len, heads, head_dim), None)``.

    Dropout applies only while ``module.training``, with a seed drawn from PyTorch's default
    generator. ``s_aux`` (gpt-oss's learned sinks, one logit per query head) become
    :func:`flash.attention`'s ``sinks`` (in float32; gradients flow back to the model's parameter).
    Raises :class:`NotImplementedError` for what flash cannot compute (``position_bias``, sparse
    ``indices``, a 4-D mask) and :class:`flash.InvalidInputError` for malformed arguments; it never
    computes something else instead.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flash's transformers attention does not support {what}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attention_mask: flash takes a 2-D padding mask, got {attention_mask.dim()}-D (a custom or "
            "model-built mask); load this model with attn_implementation='sdpa' or 'eager'"
        )
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    options: dict[str, Any] = {
        "causal": causal,
        "window": _window(sliding_window, causal),
        "softcap": float(softcap or 0.0),
        "scale": scaling,
        "dropout_p": dropout_p,
        "dropout_seed": random_seed() if dropout_p > 0 else None,
        "deterministic": bool(deterministic),
        "sinks": None if s_aux is None else s_aux.float(),
    }
    head_dim, v_dim = query.shape[-1], value.shape[-1]
    if v_dim > head_dim:
        raise NotImplementedError(f"value head_dim {v_dim} above the query's {head_dim}")
    if v_dim < head_dim:  # e.g. MLA: zero columns of V give zero output columns, cropped below
        value = torch.nn.functional.pad(value, (0, head_dim - v_dim))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, heads, head_dim) views
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    layer_idx = getattr(module, "layer_idx", None)

    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, causal, options, layer_idx)
    elif cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_q is None or cu_seq_lens_k is None:
            missing = "cu_seq_lens_q" if cu_seq_lens_q is None else "cu_seq_lens_k"
            raise InvalidInputError(missing, "a tensor, since the other cu_seq_lens was given", "None")
        varlen = {
            "cu_seqlens_q": cu_seq_lens_q.to(torch.int32),
            "cu_seqlens_k": cu_seq_lens_k.to(torch.int32),
            "max_seqlen_q": _as_int("max_length_q", max_length_q),
            "max_seqlen_k": _as_int("max_length_k", max_length_k),
        }
        out = _run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), {**options, **varlen}, "packed", layer_idx)
        out = out.unflatten(0, (batch, q_len))
    elif _is_packed(position_ids, q_len, k_len):
        assert position_ids is not None
        cu, longest = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
        varlen = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": longest, "max_seqlen_k": longest}
        out = _run(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), {**options, **varlen}, "packed", layer_idx)
        out = out.unflatten(0, (batch, q_len))
    else:
        out = _run(q, k, v, options, "dense", layer_idx)
    return (out[..., :v_dim] if v_dim < head_dim else out), None


def _padded(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: bool, options: dict[str, Any], layer_idx: int | None
) -> Tensor:
    """Pack the real tokens, attend, scatter back (padded query rows are zeros)."""
    batch, q_len = q.shape[0], q.shape[1]
    if mask.shape[0] != batch or mask.shape[1] > k.shape[1] or (causal and mask.shape[1] < q_len):
        raise InvalidInputError(
            "attention_mask",
            f"shape (batch {batch}, between {q_len if causal else 0} and {k.shape[1]} keys)",
            f"shape {tuple(mask.shape)}",
        )
    k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]  # a static cache's slots past the mask hold no token
    keys = unpad_indices(mask)
    windowed = options["window"] is not None
    if not causal and not windowed:  # the mask is the keys' (also in cross-attention): every query is real
        queries = unpad_indices(torch.ones(batch, q_len, dtype=torch.bool, device=mask.device))
    elif q_len == mask.shape[1]:  # self-attention without a cache: the queries are the keys
        queries = keys
    elif causal:  # the queries are the last q_len tokens (decoding, or prefill after a cached prefix)
        queries = unpad_indices(mask[:, -q_len:])
    else:
        raise NotImplementedError("a non-causal sliding window with a padding mask and q_len != k_len")
    if windowed:
        _require_contiguous(mask)
    varlen = {
        "cu_seqlens_q": queries.cu_seqlens,
        "cu_seqlens_k": keys.cu_seqlens,
        "max_seqlen_q": queries.max_seqlen,
        "max_seqlen_k": keys.max_seqlen,
    }
    packed = (select_tokens(q, queries.indices), select_tokens(k, keys.indices), select_tokens(v, keys.indices))
    out = _run(*packed, {**options, **varlen}, "padded", layer_idx)
    return flash.pad(out, queries.indices, batch, q_len)


def _require_contiguous(mask: Tensor) -> None:
    """Packing keeps token order but not distances: with a window, a hole inside a sequence
    would bring keys closer than they are. Left and right padding leave no hole."""
    keep = mask != 0
    starts = keep[:, 1:] & ~keep[:, :-1]
    if bool((starts.sum(dim=1) + keep[:, 0].to(torch.int64) > 1).any()):
        raise NotImplementedError(
            "attention_mask with padding between real tokens, together with a sliding window: "
            "flash cannot keep the distances; pad on the left or the right"
        )


def _run(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any], path: Path, layer_idx: int | None) -> Tensor:
    """One flash.attention call in (…, seqlen, heads, head_dim) layout, recorded if asked."""
    if _recording:
        explained = flash.explain(q, k, v, **options)
        record = CallRecord(layer_idx, path, explained.forward.chosen, explained.backward.chosen)
        for calls in _recording:
            calls.append(record)
    out = flash.attention(q, k, v, **options)
    assert isinstance(out, Tensor)
    return out
