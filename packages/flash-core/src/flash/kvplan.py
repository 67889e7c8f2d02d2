"""Plan, then run: the per-step path of a KV-cache call.

A :class:`DecodePlan` holds what one *batch composition* needs decided once: the validated
:class:`~flash.kvspec.KVCacheSpec` (with its split count), the backend that runs the KV-cache pass
and its kernel configuration. :func:`plan_for_kvcache` finds it in a bounded cache keyed by the
call's signature (shapes, strides, dtypes, devices, alignment and options, never tensor values),
so a decoding step costs a key and a dictionary lookup, then :func:`run_decode` allocates the
outputs (sizes fixed by the plan) and launches the backend. Nothing on this path reads a tensor
value on the host, which is what lets a step be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flash import dispatch
from flash import plan as attention_plan
from flash._cache import BoundedCache
from flash.backend import Backend, DecodeArgs
from flash.errors import InvalidInputError
from flash.heuristics import KernelConfig
from flash.heuristics import decode as decode_heuristics
from flash.kvspec import KVCacheSpec, build_kv_spec


@dataclass(frozen=True)
class DecodePlan:
    """The decisions for one KV-cache call signature."""

    spec: KVCacheSpec
    backend: Backend | None  # None: no sequence, nothing to run
    config: KernelConfig | None


_plans: BoundedCache[tuple, DecodePlan] = BoundedCache(256)


def forget() -> None:
    """Drop every cached plan."""
    _plans.clear()


def _key(t: object) -> object:
    """A tensor's part of the signature (cheap: this runs every step); the type of anything else
    (None, or an int ``cache_seqlens`` whose value belongs to each call)."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        return (t.shape, t.stride(), t.dtype, t.device.type, t.get_device(), t.data_ptr() & 15)
    return type(t)


def plan_for_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor | int,
    block_table: Tensor | None,
    cache_batch_idx: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    sinks: Tensor | None,
    k_descale: Tensor | None,
    v_descale: Tensor | None,
    rotary_interleaved: bool,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float,
    scale: float | None,
    sink_tokens: int,
    num_splits: int | None,
    backend: str,
) -> DecodePlan:
    """The plan of this call: found by signature, or validated, dispatched and stored on first use
    (raising :class:`~flash.errors.InvalidInputError` or :class:`~flash.errors.NoBackendError`)."""
    tensors = (q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, rotary_cos, rotary_sin,
               sinks, k_descale, v_descale)  # fmt: skip
    options = (rotary_interleaved, causal, window, softcap, scale, sink_tokens, num_splits)
    key: tuple | None
    try:
        key = (
            *(_key(t) for t in tensors),
            *options,
            *(type(o) for o in options),
            dispatch.forced_backend(backend),
        )
        found = _plans.get(key)
    except (AttributeError, TypeError, RuntimeError):  # an unhashable option: the checks below say which
        key, found = None, None
    if found is not None:
        return found
    if not isinstance(backend, str):
        raise InvalidInputError("backend", "a str", repr(backend))
    spec = build_kv_spec(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, causal=causal, window=window, softcap=softcap, scale=scale,
        sinks=sinks, sink_tokens=sink_tokens, num_splits=num_splits, k_descale=k_descale, v_descale=v_descale,
    )  # fmt: skip
    plan = make_plan(spec, backend)
    if key is not None:
        _plans.put(key, plan)
    return plan


def make_plan(spec: KVCacheSpec, requested: str) -> DecodePlan:
    """Dispatch the KV-cache pass of ``spec`` and look its configuration up."""
    if spec.empty:
        return DecodePlan(spec, None, None)
    chosen = dispatch.select(spec, "decode", requested)
    return DecodePlan(spec, chosen, decode_heuristics.config_for(chosen, spec))


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def run_decode(
    plan: DecodePlan,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    cache_batch_idx: Tensor | None,
    rotary_cos: Tensor | None,
    rotary_sin: Tensor | None,
    sinks: Tensor | None,
    k_descale: Tensor | None,
    v_descale: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Allocate ``(out, lse)`` (sizes fixed by the plan) and run the plan's backend."""
    spec = plan.spec
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if plan.backend is None or plan.config is None:
        return out, lse  # no sequence: both are empty
    if attention_plan.POISON_OUTPUTS:  # tests: an element the backend never writes cannot look right
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    args = DecodeArgs(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=_contiguous(cache_seqlens),  # type: ignore[arg-type]
        out=out,
        lse=lse,
        k=k,
        v=v,
        block_table=block_table,
        cache_batch_idx=_contiguous(cache_batch_idx),
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        sinks=_contiguous(sinks),
        k_descale=k_descale,
        v_descale=v_descale,
    )
    plan.backend.decode(spec, args, plan.config)
    return out, lse
