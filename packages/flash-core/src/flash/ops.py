"""The attention ops: an autograd function for eager calls, ``torch.library`` ops for ``torch.compile``.

Both run :mod:`flash.plan` (plan lookup, then the backend), so they compute the same thing. Eager
calls take :class:`AttentionFunction`, the cheapest path PyTorch offers to autograd. Under
``torch.compile`` the calls go through the custom ops ``flash::attention_forward`` (returns
``(out, lse)``) and ``flash::attention_backward`` (returns ``(dq, dk, dv)``), which are opaque to
the compiler (a function that calls them compiles with ``fullgraph=True``) and whose fake
implementations give the output shapes while tracing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flash.plan import CallMasks, Plan, bias_grad, bias_grad_buffer, plan_for, run_backward, run_forward
from flash.sinks import sink_grad
from flash.spec import AttentionSpec, build_spec


class AttentionFunction(torch.autograd.Function):
    """Eager autograd: the forward of a plan, and the backward from the saved ``out``/``lse``."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: Plan,
        spec: AttentionSpec,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_k: Tensor | None,
        attn_mask: Tensor | None,
        masks: CallMasks,
        sinks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        # attn_mask and sinks are arguments of their own so that autograd sees them (both may require grad).
        out, lse = run_forward(plan, spec, q, k, v, cu_seqlens_q, cu_seqlens_k, None, None, None, masks, sinks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks)
        ctx.plan, ctx.spec, ctx.masks = plan, spec, masks
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
        dbias = bias_grad_buffer(ctx.spec, q.device)
        dq, dk, dv = run_backward(ctx.plan, ctx.spec, dout, q, k, v, out, lse, cu_q, cu_k, ctx.masks, dbias)
        dsinks = sink_grad(sinks, out, lse, dout, ctx.spec.layout) if ctx.needs_input_grad[9] else None
        return dq, dk, dv, None, None, None, None, bias_grad(dbias, ctx.masks.attn_mask), None, dsinks


#: The ops' arguments after the tensors, in order (forward and backward take the same options).
_OPTIONS = (
    *("layout", "causal", "window_left", "window_right", "softcap", "scale"),
    *("dropout_p", "dropout_seed", "deterministic", "backend", "sink_tokens"),
)
_BACKWARD_TENSORS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
#: The forward's own arguments before the options (the fp8 ones and the sinks).
_FORWARD_TENSORS = (*_BACKWARD_TENSORS, "q_descale", "k_descale", "v_descale", "out_dtype", "sinks")


def _window(left: int, right: int) -> tuple[int, int] | None:
    return None if (left, right) == (-1, -1) else (left, right)


def _plan(q: Tensor, k: Tensor, v: Tensor, named: dict[str, Any]) -> tuple[Plan, AttentionSpec]:
    return plan_for(
        q, k, v, named["cu_seqlens_q"], named["cu_seqlens_k"], named["max_seqlen_q"], named["max_seqlen_k"],
        named.get("q_descale"), named.get("k_descale"), named.get("v_descale"), named["layout"], named["causal"],
        _window(named["window_left"], named["window_right"]), named["softcap"], named["scale"], named["dropout_p"],
        named["dropout_seed"], named["deterministic"], named["backend"], check_values=None, sinks=named.get("sinks"),
        sink_tokens=named["sink_tokens"], out_dtype=named.get("out_dtype"),
    )  # fmt: skip


@torch.library.custom_op("flash::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    q_descale: Optional[Tensor],
    k_descale: Optional[Tensor],
    v_descale: Optional[Tensor],
    out_dtype: Optional[torch.dtype],
    sinks: Optional[Tensor],
    layout: str,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: Optional[float],
    dropout_p: float,
    dropout_seed: Optional[int],
    deterministic: bool,
    backend: str,
    sink_tokens: int,
) -> tuple[Tensor, Tensor]:
    named = {name: value for name, value in locals().items() if name not in ("q", "k", "v")}
    plan, spec = _plan(q, k, v, named)
    return run_forward(plan, spec, q, k, v, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale, sinks=sinks)


def _fake_spec(q: Tensor, k: Tensor, v: Tensor, named: dict[str, Any]) -> AttentionSpec:
    return build_spec(
        q, k, v, layout=named["layout"], causal=named["causal"],
        window=_window(named["window_left"], named["window_right"]), softcap=named["softcap"], scale=named["scale"],
        cu_seqlens_q=named["cu_seqlens_q"], cu_seqlens_k=named["cu_seqlens_k"], max_seqlen_q=named["max_seqlen_q"],
        max_seqlen_k=named["max_seqlen_k"], dropout_p=named["dropout_p"],
        dropout_seed=named["dropout_seed"] if named["dropout_p"] else None, q_descale=named["q_descale"],
        k_descale=named["k_descale"], v_descale=named["v_descale"], out_dtype=named["out_dtype"],
        deterministic=named["deterministic"], check_values=False, sinks=named["sinks"],
        sink_tokens=named["sink_tokens"],
    )  # fmt: skip


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, *rest):
    spec = _fake_spec(q, k, v, dict(zip(_FORWARD_TENSORS + _OPTIONS, rest)))
    return q.new_empty(q.shape, dtype=spec.out_dtype), q.new_empty(spec.lse_shape(), dtype=spec.lse_dtype)


@torch.library.custom_op("flash::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    layout: str,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: Optional[float],
    dropout_p: float,
    dropout_seed: Optional[int],
    deterministic: bool,
    backend: str,
    sink_tokens: int,
) -> tuple[Tensor, Tensor, Tensor]:
    named = {name: value for name, value in locals().items() if name not in ("q", "k", "v", "dout", "out", "lse")}
    plan, spec = _plan(q, k, v, named)
    return run_backward(plan, spec, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, *rest = inputs
    named = dict(zip(_FORWARD_TENSORS + _OPTIONS, rest))
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, named["cu_seqlens_q"], named["cu_seqlens_k"], named["sinks"])
    ctx.max_seqlens = (named["max_seqlen_q"], named["max_seqlen_k"])
    ctx.options = [named[name] for name in _OPTIONS]
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, *ctx.options)
    rest: list[Optional[Tensor]] = [None] * (len(_FORWARD_TENSORS) + len(_OPTIONS))
    if sinks is not None:  # the sinks' gradient comes from out and lse alone (flash.sinks)
        rest[_FORWARD_TENSORS.index("sinks")] = sink_grad(sinks, out, lse, dout, ctx.options[0])
    return (dq, dk, dv, *rest)


attention_forward.register_autograd(_backward, setup_context=_setup_context)
