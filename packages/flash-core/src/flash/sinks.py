"""Attention sinks: learned per-head logits that join every row's softmax without a value.

With sink logit ``s_h`` for query head ``h``, row ``i`` of that head computes

    lse_i = log(exp(s_h) + sum_j exp(S_ij))        O_i = sum_j exp(S_ij - lse_i) V_j

so the weights of the real keys sum to less than one (gpt-oss). The sink behaves as a key whose
value is zero: its probability is ``exp(s_h - lse_i)``, and since every backend's LSE includes it,
a backward that recomputes ``P = exp(S - lse)`` for the real keys needs no change. The sink's own
gradient follows from the softmax gradient with a zero value row::

    dL/ds_h = -sum_i exp(s_h - lse_i) * delta_i,       delta_i = rowsum(dO_i * O_i)

:func:`sink_grad` computes it from the forward's ``out`` and ``lse`` alone, so it is shared by
every backend (and the ``torch.compile`` path) rather than asked of each.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sink_grad(sinks: Tensor, out: Tensor, lse: Tensor, dout: Tensor, layout: str) -> Tensor:
    """The gradient of the sink logits ``sinks`` (heads,) given the forward's ``out`` and ``lse``
    as :func:`flash.attention` returns them (any layout, padded or varlen) and the output gradient."""
    compute = torch.float64 if lse.dtype == torch.float64 else torch.float32
    delta = (dout.to(compute) * out.to(compute)).sum(dim=-1)  # rows, in out's (.., seq, heads) order
    if layout == "bshd":
        delta = delta.transpose(-1, -2)  # (..., heads, seq) like the LSE
    lse_c = lse.to(compute)
    p_sink = torch.exp(sinks.to(compute)[:, None] - lse_c)
    # A row whose LSE is -inf saw neither a key nor a finite sink: it has no gradient to give.
    p_sink = torch.where(lse_c == float("-inf"), torch.zeros_like(p_sink), p_sink)
    heads = sinks.shape[0]
    return -(p_sink * delta).reshape(-1, heads, lse.shape[-1]).sum(dim=(0, 2)).to(sinks.dtype)
