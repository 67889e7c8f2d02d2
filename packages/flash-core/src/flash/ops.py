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
from flash.spec import AttentionSpec, build_spec, canonical, canonical_lse


def _spec(
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
    check_values: bool,
) -> AttentionSpec:
    window = None if (window_left, window_right) == (-1, -1) else (window_left, window_right)
    return build_spec(
        q,
        k,
        v,
        layout=layout,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed if dropout_p else None,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        deterministic=deterministic,
        check_values=check_values,
    )


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
    spec = _spec(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale, k_descale, v_descale,
        layout, causal, window_left, window_right, softcap, scale, dropout_p, dropout_seed, deterministic, True,
    )  # fmt: skip
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    if spec.empty:  # no queries, or rows that see no key: output 0, LSE -inf
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    chosen = dispatch.select(spec, "forward", backend)
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
    chosen.forward(spec, args)
    return out, lse


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale, k_descale,
                            v_descale, layout, causal, window_left, window_right, softcap, scale, dropout_p,
                            dropout_seed, deterministic, backend):  # fmt: skip
    spec = _spec(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale, k_descale, v_descale,
        layout, causal, window_left, window_right, softcap, scale, dropout_p, dropout_seed, deterministic, False,
    )  # fmt: skip
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
    spec = _spec(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None, None,
        layout, causal, window_left, window_right, softcap, scale, dropout_p, dropout_seed, deterministic, False,
    )  # fmt: skip  (the forward already checked the values)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if spec.empty:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()  # kernels take any strides but a unit one along head_dim
    chosen = dispatch.select(spec, "backward", backend)
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
    chosen.backward(spec, args)
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Positions of the forward op's arguments, for the autograd glue below.
_FORWARD_ARGS = (
    "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k q_descale k_descale v_descale layout causal "
    "window_left window_right softcap scale dropout_p dropout_seed deterministic backend"
).split()
_OPTIONS = _FORWARD_ARGS[_FORWARD_ARGS.index("layout") :]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    named = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(named["q"], named["k"], named["v"], out, lse, named["cu_seqlens_q"], named["cu_seqlens_k"])
    ctx.max_seqlens = (named["max_seqlen_q"], named["max_seqlen_k"])
    ctx.options = [named[name] for name in _OPTIONS]
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, *ctx.options)
    return (dq, dk, dv) + (None,) * (len(_FORWARD_ARGS) - 3)


attention_forward.register_autograd(_backward, setup_context=_setup_context)
