"""The attention custom ops: validation, dispatch and autograd behind one ``torch.library`` op.

``flash::attention_forward`` returns ``(out, lse)``; ``flash::attention_backward``
returns ``(dq, dk, dv)``. Both are opaque to ``torch.compile`` (a function that
calls them compiles with ``fullgraph=True``), and their fake implementations
give the output shapes while tracing. The real implementations validate the
call (:func:`flash.spec.build_spec`), pick a backend (:mod:`flash.dispatch`)
and run it; the backward may come from a different backend than the forward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flash import dispatch
from flash.backend import BackwardArgs, ForwardArgs
from flash.heuristics import autotune
from flash.spec import AttentionSpec, build_spec, canonical, canonical_lse

#: Tests set this (flash.testing.poisoned_outputs) to fill outputs with NaN before a backend runs,
#: so an element a backend never writes cannot pass by holding a stale correct value.
POISON_OUTPUTS = False


#: The ops' arguments after the tensors, in order (forward and backward take the same options).
_OPTIONS = (
    *("layout", "causal", "window_left", "window_right", "softcap", "scale"),
    *("dropout_p", "dropout_seed", "deterministic", "backend"),
)


def _spec(q: Tensor, k: Tensor, v: Tensor, named: dict[str, Any], check_values: bool) -> AttentionSpec:
    """Build the spec from an op's named arguments (the op signature flattens the public options)."""
    options = {key: value for key, value in named.items() if key not in ("q", "k", "v", "backend")}
    left, right = options.pop("window_left"), options.pop("window_right")
    options["window"] = None if (left, right) == (-1, -1) else (left, right)
    if not options["dropout_p"]:
        options["dropout_seed"] = None
    return build_spec(q, k, v, check_values=check_values, **options)


def _arguments(frame_locals: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: frame_locals[name] for name in names}


_BACKWARD_TENSORS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_FORWARD_TENSORS = (*_BACKWARD_TENSORS, "q_descale", "k_descale", "v_descale")


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
) -> tuple[Tensor, Tensor]:
    named = _arguments(locals(), _FORWARD_TENSORS + _OPTIONS)  # the parameters, by name
    spec = _spec(q, k, v, named, check_values=True)
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if spec.empty:  # no queries, or rows that see no key: output 0, LSE -inf
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    chosen = dispatch.select(spec, "forward", backend)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    args = ForwardArgs(
        q=canonical(q, spec),
        k=canonical(k, spec),
        v=canonical(v, spec),
        out=canonical(out, spec),
        lse=canonical_lse(lse, spec),
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    if autotune.enabled():
        autotune.ensure_tuned(chosen, spec, "forward", lambda: chosen.forward(spec, args))
    chosen.forward(spec, args)
    return out, lse


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, *rest):
    spec = _spec(q, k, v, dict(zip(_FORWARD_TENSORS + _OPTIONS, rest)), check_values=False)
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
) -> tuple[Tensor, Tensor, Tensor]:
    named = _arguments(locals(), _BACKWARD_TENSORS + _OPTIONS)
    named.update(q_descale=None, k_descale=None, v_descale=None)
    spec = _spec(q, k, v, named, check_values=False)  # the forward checked the values
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if spec.empty:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()  # kernels take any strides but a unit one along head_dim
    chosen = dispatch.select(spec, "backward", backend)
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
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
    )
    if autotune.enabled():
        autotune.ensure_tuned(chosen, spec, "backward", lambda: chosen.backward(spec, args))
    chosen.backward(spec, args)
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, *rest = inputs
    named = dict(zip(_FORWARD_TENSORS + _OPTIONS, rest))
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, named["cu_seqlens_q"], named["cu_seqlens_k"])
    ctx.max_seqlens = (named["max_seqlen_q"], named["max_seqlen_k"])
    ctx.options = [named[name] for name in _OPTIONS]
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, *ctx.options)
    return (dq, dk, dv) + (None,) * (len(_FORWARD_TENSORS) + len(_OPTIONS))


attention_forward.register_autograd(_backward, setup_context=_setup_context)
