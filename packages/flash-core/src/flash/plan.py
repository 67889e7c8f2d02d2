"""Plan, then run: the per-call path of every attention call.

A :class:`Plan` is what one kind of call needs decided once: the validated spec (with the
dropout seed left for each call to fill in), the forward backend and its kernel configuration,
and, on first use, the same for the backward. :func:`plan_for` finds it in a bounded cache keyed
by the call's *signature* (shapes, strides, dtypes, devices, alignment and options, never the
tensors' values), so a repeated call costs a tuple and a dictionary lookup instead of the
validation and dispatch; :func:`run_forward` and :func:`run_backward` allocate the outputs and
launch the backend. Eager calls and the ``torch.library`` ops used under ``torch.compile``
share all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flash import dispatch, heuristics
from flash._cache import BoundedCache
from flash.backend import Backend, BackwardArgs, ForwardArgs, MaskTensors
from flash.heuristics import KernelConfig, autotune
from flash.mask_checks import mask4
from flash.spec import (
    AttentionSpec,
    build_spec,
    canonical,
    canonical_lse,
    check_argument_types,
    check_dropout_seed,
    value_checks,
)

#: Tests set this (flash.testing.poisoned_outputs) to fill outputs with NaN before a backend runs,
#: so an element a backend never writes cannot pass by holding a stale correct value.
POISON_OUTPUTS = False

if TYPE_CHECKING:
    import flash


@dataclass
class Plan:
    """The decisions for one call signature: spec, backends and kernel configurations."""

    spec: AttentionSpec
    requested: str
    forward: Backend | None  # None: nothing to compute (an empty problem)
    forward_config: KernelConfig | None
    _backward: tuple[Backend, KernelConfig] | None = field(default=None, repr=False)

    def forward_run(self) -> tuple[Backend, KernelConfig | None]:
        """The forward backend and its configuration; None while autotuning picks it per call."""
        assert self.forward is not None
        return self.forward, None if autotune.enabled() else self.forward_config

    def backward_run(self) -> tuple[Backend, KernelConfig | None]:
        """The backward backend (chosen on first use) and its configuration; None while autotuning."""
        if self._backward is None:
            backend = dispatch.select(self.spec, "backward", self.requested)
            self._backward = (backend, heuristics.config_for(backend, self.spec, "backward"))
        backend, config = self._backward
        return backend, None if autotune.enabled() else config


_plans: BoundedCache[tuple, Plan] = BoundedCache(1024)


@dataclass(frozen=True)
class CallMasks:
    """The mask and score arguments of one call, as given (None: not used)."""

    attn_mask: Tensor | None = None
    alibi_slopes: Tensor | None = None
    block_mask: flash.BlockMask | None = None
    score_mod: Callable[..., Tensor] | None = None
    score_mod_grad: Callable[..., Tensor] | None = None
    mask_mod: Callable[..., Tensor] | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`flash.spec.build_spec`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def key(self) -> tuple:
        """Their part of a plan key: tensor layouts, block-mask sizes, functions by identity; never values."""
        mask, block = self.attn_mask, self.block_mask
        grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
        block_key = None if block is None else (type(block), block.info, block.device)
        return (
            tensor_key(mask), grad, tensor_key(self.alibi_slopes), block_key,
            self.score_mod, self.score_mod_grad, self.mask_mod,
        )  # fmt: skip

    def tensors(self) -> MaskTensors | None:
        """What backends receive (the attn_mask as its 4-D view)."""
        if self.attn_mask is None and self.alibi_slopes is None and self.block_mask is None:
            return None
        mask = None if self.attn_mask is None else mask4(self.attn_mask)
        return MaskTensors(mask, self.alibi_slopes, self.block_mask)


NO_MASKS = CallMasks()


def forget() -> None:
    """Drop every cached plan (tests that swap a configuration in, or a backend's table)."""
    _plans.clear()


def tensor_key(t: Tensor | None) -> tuple | None:
    """A tensor's part of a plan's key: what a spec reads off it (shape, strides, dtype, device,
    16-byte alignment), never its values."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def _optional_keys(*tensors: Tensor | None) -> tuple | None:
    """The keys of a call's optional tensors; None when it has none (the common call, kept cheap)."""
    for t in tensors:
        if t is not None:
            return tuple(tensor_key(t) for t in tensors)
    return None


NO_MASKS_KEY = NO_MASKS.key()


def call_masks(
    attn_mask: Tensor | None,
    alibi_slopes: Tensor | None,
    block_mask: flash.BlockMask | None,
    score_mod: Callable[..., Tensor] | None,
    score_mod_grad: Callable[..., Tensor] | None,
    mask_mod: Callable[..., Tensor] | None,
) -> CallMasks:
    """The call's :class:`CallMasks`; ``NO_MASKS`` itself when it has none (its plan key is precomputed)."""
    tensors = attn_mask is None and alibi_slopes is None and block_mask is None
    if tensors and score_mod is None and score_mod_grad is None and mask_mod is None:
        return NO_MASKS
    return CallMasks(attn_mask, alibi_slopes, block_mask, score_mod, score_mod_grad, mask_mod)


def make_plan(spec: AttentionSpec, requested: str) -> Plan:
    """Dispatch the forward of ``spec`` and look its configuration up (raises NoBackendError)."""
    if spec.empty:
        return Plan(spec, requested, None, None)
    backend = dispatch.select(spec, "forward", requested)
    return Plan(spec, requested, backend, heuristics.config_for(backend, spec, "forward"))


def plan_for(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    q_descale: Tensor | None,
    k_descale: Tensor | None,
    v_descale: Tensor | None,
    layout: str,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float,
    scale: float | None,
    dropout_p: float,
    dropout_seed: int | None,
    deterministic: bool,
    backend: str,
    check_values: bool | None,
    masks: CallMasks = NO_MASKS,
    sinks: Tensor | None = None,
    sink_tokens: int = 0,
    out_dtype: torch.dtype | None = None,
) -> tuple[Plan, AttentionSpec]:
    """The plan of this call and its spec (the plan's, with this call's dropout seed).

    The first call of a signature checks every argument (raising :class:`~flash.errors.InvalidInputError`);
    later calls with the same signature find its plan by a key that holds the arguments' Python
    types too (``True == 1`` in Python, so a key without them would let ``causal=1`` through).
    Values of ``cu_seqlens`` are checked per call where ``check_values`` says so.
    """

    def spec_of(check: bool | None) -> AttentionSpec:
        return build_spec(
            q, k, v, layout=layout, causal=causal, window=window, softcap=softcap, scale=scale,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, dropout_seed=dropout_seed, q_descale=q_descale,
            k_descale=k_descale, v_descale=v_descale, deterministic=deterministic, check_values=check,
            sinks=sinks, sink_tokens=sink_tokens, out_dtype=out_dtype, **masks.options(),
        )  # fmt: skip

    key: tuple | None = None
    plan: Plan | None = None
    try:
        if cu_seqlens_q is not None:
            check = value_checks(q.device) if check_values is None else check_values
            if check or max_seqlen_q is None or max_seqlen_k is None:
                # The offsets' values belong to this call only: check them, and read the lengths, each time.
                spec = spec_of(check)
                max_seqlen_q, max_seqlen_k = spec.seqlen_q, spec.seqlen_k
        signature = (
            tensor_key(q), tensor_key(k), tensor_key(v),
            _optional_keys(cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale, sinks),
            max_seqlen_q, type(max_seqlen_q), max_seqlen_k, type(max_seqlen_k), layout, type(layout),
            causal, type(causal), window, softcap, type(softcap), scale, type(scale), dropout_p, type(dropout_p),
            deterministic, type(deterministic), type(check_values), type(dropout_seed), sink_tokens, type(sink_tokens),
            out_dtype,
            dispatch.forced_backend(backend),
            NO_MASKS_KEY if masks is NO_MASKS else masks.key(),
        )  # fmt: skip
        plan = _plans.get(signature)
        key = signature
    except (AttributeError, TypeError):  # not a tensor, or an unhashable option: the checks below say which
        pass
    if plan is None:
        check_argument_types(
            q=q, k=k, v=v, causal=causal, softcap=softcap, scale=scale, layout=layout, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
            dropout_seed=dropout_seed, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            deterministic=deterministic, check_values=check_values, backend=backend, sinks=sinks,
            sink_tokens=sink_tokens, out_dtype=out_dtype,
        )  # fmt: skip
        plan = make_plan(dataclasses.replace(spec_of(False), dropout_seed=0), backend)
        if key is not None:
            _plans.put(key, plan)
    if dropout_p:
        return plan, dataclasses.replace(plan.spec, dropout_seed=check_dropout_seed(dropout_seed))
    return plan, plan.spec


def _contiguous(cu: Tensor | None) -> Tensor | None:
    """Kernels read offsets (and sink logits) as a contiguous array; a strided view is copied once here."""
    return cu if cu is None or cu.is_contiguous() else cu.contiguous()


def run_forward(
    plan: Plan,
    spec: AttentionSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    q_descale: Tensor | None,
    k_descale: Tensor | None,
    v_descale: Tensor | None,
    masks: CallMasks = NO_MASKS,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Allocate ``(out, lse)`` and run the plan's forward backend on them."""
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if plan.forward is None:  # no queries, or no keys: output 0, LSE -inf (or the sink's logit)
        out.zero_()
        if sinks is None or spec.total_q == 0:
            return out, lse.fill_(float("-inf"))
        return out, lse.copy_(sinks.to(lse.dtype)[:, None].expand(lse.shape))
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    args = ForwardArgs(
        q=canonical(q, spec),
        k=canonical(k, spec),
        v=canonical(v, spec),
        out=canonical(out, spec),
        lse=canonical_lse(lse, spec),
        cu_seqlens_q=_contiguous(cu_seqlens_q),
        cu_seqlens_k=_contiguous(cu_seqlens_k),
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        masks=masks.tensors(),
        sinks=_contiguous(sinks),
    )
    backend, config = plan.forward_run()
    if config is None:  # autotuning
        autotune.ensure_tuned(backend, spec, "forward", lambda c: backend.forward(spec, args, c))
        config = heuristics.config_for(backend, spec, "forward")
    backend.forward(spec, args, config)
    return out, lse


def run_backward(
    plan: Plan,
    spec: AttentionSpec,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    masks: CallMasks = NO_MASKS,
    dbias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Allocate ``(dq, dk, dv)`` and run the plan's backward backend (any forward's ``out``/``lse``).

    ``dbias`` (from :func:`bias_grad_buffer`, when an additive mask requires grad) receives the
    scores' gradient; :func:`bias_grad` sums it down to the mask's shape.
    """
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if plan.forward is None:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()  # kernels take any strides but a unit one along head_dim
    backend, config = plan.backward_run()
    if POISON_OUTPUTS:
        for grad in (dq, dk, dv):
            grad.fill_(float("nan"))
    args = BackwardArgs(
        q=canonical(q, spec),
        k=canonical(k, spec),
        v=canonical(v, spec),
        out=canonical(out, spec),
        lse=canonical_lse(lse, spec),
        dout=canonical(dout, spec),
        dq=canonical(dq, spec),
        dk=canonical(dk, spec),
        dv=canonical(dv, spec),
        cu_seqlens_q=_contiguous(cu_seqlens_q),
        cu_seqlens_k=_contiguous(cu_seqlens_k),
        masks=masks.tensors(),
        dbias=dbias,
    )
    if config is None:  # autotuning
        autotune.ensure_tuned(backend, spec, "backward", lambda c: backend.backward(spec, args, c))
        config = heuristics.config_for(backend, spec, "backward")
    backend.backward(spec, args, config)
    return dq, dk, dv


def bias_grad_buffer(spec: AttentionSpec, device: torch.device) -> Tensor | None:
    """Zeros (batch, heads_q, seqlen_q, seqlen_k) for the scores' gradient, if an additive mask requires grad."""
    if spec.mask is None or not spec.mask.requires_grad:
        return None
    full = (spec.batch, spec.heads_q, spec.seqlen_q, spec.seqlen_k)
    return torch.zeros(full, dtype=spec.lse_dtype, device=device)


def bias_grad(dbias: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """The (batch, heads, sq, sk) score gradient summed over the axes the mask broadcasts along."""
    if dbias is None or mask is None:
        return None
    shape = mask4(mask).shape
    axes = tuple(axis for axis in range(4) if shape[axis] == 1 and dbias.shape[axis] != 1)
    summed = dbias.sum(dim=axes, keepdim=True) if axes else dbias
    return summed.reshape(mask.shape).to(mask.dtype)
