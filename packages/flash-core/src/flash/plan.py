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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flash import dispatch, heuristics
from flash.backend import Backend, BackwardArgs, ForwardArgs
from flash.dispatch import BoundedCache
from flash.heuristics import KernelConfig, autotune
from flash.spec import AttentionSpec, build_spec, canonical, canonical_lse, check_dropout_seed, value_checks

#: Tests set this (flash.testing.poisoned_outputs) to fill outputs with NaN before a backend runs,
#: so an element a backend never writes cannot pass by holding a stale correct value.
POISON_OUTPUTS = False


@dataclass
class Plan:
    """The decisions for one call signature: spec, backends and kernel configurations."""

    spec: AttentionSpec
    requested: str
    forward: Backend | None  # None: nothing to compute (an empty problem)
    forward_config: KernelConfig | None
    _backward: tuple[Backend, KernelConfig] | None = field(default=None, repr=False)

    def forward_run(self, spec: AttentionSpec) -> tuple[Backend, KernelConfig]:
        """The forward backend and the configuration to run ``spec`` with (autotuned if asked)."""
        assert self.forward is not None and self.forward_config is not None
        if autotune.enabled():
            return self.forward, heuristics.config_for(self.forward, spec, "forward")
        return self.forward, self.forward_config

    def backward_run(self, spec: AttentionSpec) -> tuple[Backend, KernelConfig]:
        """The backward backend (chosen on first use) and its configuration."""
        if self._backward is None:
            backend = dispatch.select(self.spec, "backward", self.requested)
            self._backward = (backend, heuristics.config_for(backend, self.spec, "backward"))
        backend, config = self._backward
        if autotune.enabled():
            return backend, heuristics.config_for(backend, spec, "backward")
        return backend, config


_plans: BoundedCache[tuple, Plan] = BoundedCache(1024)


def _tensor_key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


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
) -> tuple[Plan, AttentionSpec]:
    """The plan of this call and its spec (the plan's, with this call's dropout seed).

    Arguments must already have their Python types checked (:func:`flash.spec.check_argument_types`):
    the cache key relies on ``True`` never standing for ``1``. Values of ``cu_seqlens`` are
    validated per call when ``check_values`` says so; everything else once per signature.
    """
    options = dict(
        layout=layout,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        dropout_p=dropout_p,
        deterministic=deterministic,
    )
    check = value_checks(q.device) if check_values is None else check_values
    varlen = cu_seqlens_q is not None and cu_seqlens_k is not None
    if varlen and (check or max_seqlen_q is None or max_seqlen_k is None):
        # The offsets' values are part of this call only: check them, and derive the lengths, each time.
        spec = build_spec(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            dropout_seed=dropout_seed, check_values=check, **options,
        )  # fmt: skip
        max_seqlen_q, max_seqlen_k = spec.seqlen_q, spec.seqlen_k
    forced = dispatch.forced_backend(backend)
    key = (
        *(_tensor_key(t) for t in (q, k, v, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale)),
        max_seqlen_q, max_seqlen_k, layout, causal, window, softcap, type(softcap), scale, type(scale),
        dropout_p, type(dropout_p), deterministic, forced,
    )  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        spec = build_spec(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            dropout_seed=dropout_seed, check_values=False, **options,
        )  # fmt: skip
        plan = make_plan(dataclasses.replace(spec, dropout_seed=0), backend)
        _plans.put(key, plan)
    if dropout_p:
        return plan, dataclasses.replace(plan.spec, dropout_seed=check_dropout_seed(dropout_seed))
    return plan, plan.spec


def _contiguous(cu: Tensor | None) -> Tensor | None:
    """Kernels read offsets as a contiguous array; a strided view is copied once here."""
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
) -> tuple[Tensor, Tensor]:
    """Allocate ``(out, lse)`` and run the plan's forward backend on them."""
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if plan.forward is None:  # no queries, or no keys: output 0, LSE -inf
        return out.zero_(), lse.fill_(float("-inf"))
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
    )
    backend, config = plan.forward_run(spec)
    if autotune.enabled():
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Allocate ``(dq, dk, dv)`` and run the plan's backward backend (any forward's ``out``/``lse``)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if plan.forward is None:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()  # kernels take any strides but a unit one along head_dim
    backend, config = plan.backward_run(spec)
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
    )
    if autotune.enabled():
        autotune.ensure_tuned(backend, spec, "backward", lambda c: backend.backward(spec, args, c))
        config = heuristics.config_for(backend, spec, "backward")
    backend.backward(spec, args, config)
    return dq, dk, dv
