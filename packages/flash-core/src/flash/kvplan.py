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
from typing import NamedTuple

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


class CallTensors(NamedTuple):
    """The tensors of one KV-cache call as the caller passed them (``cache_seqlens``: a tensor or an int)."""

    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    k: Tensor | None
    v: Tensor | None
    cache_seqlens: Tensor | int
    block_table: Tensor | None
    cache_batch_idx: Tensor | None
    rotary_cos: Tensor | None
    rotary_sin: Tensor | None
    sinks: Tensor | None
    k_descale: Tensor | None
    v_descale: Tensor | None


class CallOptions(NamedTuple):
    """The other options of one KV-cache call."""

    rotary_interleaved: bool
    causal: bool
    window: tuple[int, int] | None
    softcap: float
    scale: float | None
    sink_tokens: int
    num_splits: int | None


def _key(t: object) -> object:
    """A tensor's part of the signature (cheap: this runs every step); the type of anything else
    (None, or an int ``cache_seqlens`` whose value belongs to each call)."""
    if isinstance(t, Tensor):
        return attention_plan.tensor_key(t)
    return None if t is None else type(t)


def spec_of(tensors: CallTensors, options: CallOptions) -> KVCacheSpec:
    """Validate the call (:func:`flash.kvspec.build_kv_spec`)."""
    return build_kv_spec(
        tensors.q, tensors.k_cache, tensors.v_cache, tensors.k, tensors.v, cache_seqlens=tensors.cache_seqlens,
        block_table=tensors.block_table, cache_batch_idx=tensors.cache_batch_idx, rotary_cos=tensors.rotary_cos,
        rotary_sin=tensors.rotary_sin, sinks=tensors.sinks, k_descale=tensors.k_descale, v_descale=tensors.v_descale,
        **options._asdict(),
    )  # fmt: skip


def plan_for_kvcache(tensors: CallTensors, options: CallOptions, backend: str) -> DecodePlan:
    """The plan of this call: found by signature, or validated, dispatched and stored on first use
    (raising :class:`~flash.errors.InvalidInputError` or :class:`~flash.errors.NoBackendError`).
    The key holds the options' Python types too (``causal=1`` must not find ``causal=True``'s plan)."""
    key: tuple | None
    try:
        key = (*map(_key, tensors), *options, *map(type, options), dispatch.forced_backend(backend))
        found = _plans.get(key)
    except (AttributeError, TypeError, RuntimeError):  # an unhashable option: the checks below say which
        key, found = None, None
    if found is not None:
        return found
    if not isinstance(backend, str):
        raise InvalidInputError("backend", "a str", repr(backend))
    plan = make_plan(spec_of(tensors, options), backend)
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


def run_decode(plan: DecodePlan, tensors: CallTensors, cache_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Allocate ``(out, lse)`` (sizes fixed by the plan) and run the plan's backend, with the lengths
    as an int32 tensor."""
    spec, q = plan.spec, tensors.q
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if plan.backend is None or plan.config is None:
        return out, lse  # no sequence: both are empty
    if attention_plan.POISON_OUTPUTS:  # tests: an element the backend never writes cannot look right
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    args = DecodeArgs(
        q=q,
        k_cache=tensors.k_cache,
        v_cache=tensors.v_cache,
        cache_seqlens=cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous(),
        out=out,
        lse=lse,
        k=tensors.k,
        v=tensors.v,
        block_table=tensors.block_table,
        cache_batch_idx=_contiguous(tensors.cache_batch_idx),
        rotary_cos=tensors.rotary_cos,
        rotary_sin=tensors.rotary_sin,
        sinks=_contiguous(tensors.sinks),
        k_descale=tensors.k_descale,
        v_descale=tensors.v_descale,
    )
    plan.backend.decode(spec, args, plan.config)
    return out, lse
