"""The exact oracle: dense attention for every spec option, the source of truth of all tests.

It materialises the full score matrix of each sequence, so it is for checking,
not for running. :func:`dense_attention` computes in any dtype: in float64 it is
the oracle; in the inputs' own low precision it is the *naive* computation whose
error sets the tolerance of the kernels (see :mod:`flash.testing`). It is built
from differentiable torch ops, so autograd through it gives reference gradients.
"""

from __future__ import annotations

import torch

from flash import dropout
from flash.backend import MaskTensors
from flash.masking import tile_mask, visible_matmul
from flash.spec import AttentionSpec, canonical
from flash.terms import Terms, region


def descaled(t: torch.Tensor, descale: torch.Tensor | None, batch: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Canonical ``t`` upcast to ``dtype`` times its fp8 descale factor (``batch``: varlen sequence index)."""
    t = t.to(dtype)
    if descale is None:
        return t
    d = descale.to(dtype)
    if d.dim() == 2:  # per (batch, head)
        d = d if batch is None else d[batch : batch + 1]
        return t * d[:, None, :, None]
    return t * d.reshape(())


def _sequence_bounds(
    spec: AttentionSpec, cu_q: list[int] | None, cu_k: list[int] | None
) -> list[tuple[int, int, int, int]]:
    """(q_start, q_len, k_start, k_len) per sequence; one entry for the whole padded batch."""
    if cu_q is None or cu_k is None:
        return [(0, spec.seqlen_q, 0, spec.seqlen_k)]
    return [(cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]) for b in range(spec.batch)]


def dense_attention(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    masks: MaskTensors | None = None,
    sinks: torch.Tensor | None = None,
    p_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of the caller's tensors (caller's layout) computed in ``compute_dtype``.

    ``masks`` holds the tensors of the spec's mask options (:mod:`flash.terms`); an additive mask
    that requires grad gets its gradient through autograd like q, k and v. ``sinks`` (heads_q,) are
    per-head logits that join every row's softmax denominator (and its LSE) without a value.
    ``p_dtype``: the probabilities are rounded to it before P V (fp8 tensor cores take P in fp8).
    Returns ``(out, lse)`` shaped as :func:`flash.attention` returns them, both in ``compute_dtype``;
    differentiable in q, k, v and ``sinks``.
    """
    terms = Terms(spec, masks)
    qc, kc, vc = canonical(q, spec), canonical(k, spec), canonical(v, spec)
    cu_q = cu_seqlens_q.tolist() if cu_seqlens_q is not None else None
    cu_k = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    group = spec.group_size
    outs, lses = [], []
    for index, (q0, len_q, k0, len_k) in enumerate(_sequence_bounds(spec, cu_q, cu_k)):
        batch = None if cu_q is None else index
        qs = descaled(qc[:, q0 : q0 + len_q], q_descale, batch, compute_dtype)  # (B, Sq, Hq, D)
        ks = descaled(kc[:, k0 : k0 + len_k], k_descale, batch, compute_dtype)
        vs = descaled(vc[:, k0 : k0 + len_k], v_descale, batch, compute_dtype)
        ks = ks.repeat_interleave(group, dim=2)  # the oracle may repeat K/V; kernels may not
        vs = vs.repeat_interleave(group, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", qs, ks) * spec.scale
        if spec.softcap:
            s = spec.softcap * torch.tanh(s / spec.softcap)
        ids = list(range(qs.shape[0])) if cu_q is None else [index]
        where = region(ids, spec.heads_q, (0, len_q), (0, len_k), len_q, len_k, s.device)
        s = terms.add(s, where)
        seen = tile_mask((0, len_q), (0, len_k), len_q, len_k, spec.mask_bounds, s.device, spec.sink_tokens)
        extra = terms.seen(where)
        if extra is not None:
            seen = seen & extra
        if spec.masked or extra is not None:
            s = s.masked_fill(~seen, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True) if len_k else s.new_full((*s.shape[:-1], 1), float("-inf"))
        sink = None if sinks is None else sinks.to(compute_dtype)[None, :, None, None]
        if sink is not None:
            row_max = torch.maximum(row_max, sink)
        row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max).detach()
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:  # one more term in the denominator, with no value
            denom = denom + torch.exp(sink - row_max)
        lse = (torch.log(denom) + row_max).squeeze(-1)  # -inf where the row sees nothing
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        if spec.dropout_p:
            keep = dropout.keep_mask(
                spec.dropout_seed,
                ids,
                torch.arange(spec.heads_q, device=s.device),
                torch.arange(len_q, device=s.device),
                torch.arange(len_k, device=s.device),
                spec.dropout_p,
            )
            p = p * keep.to(p.dtype) / (1.0 - spec.dropout_p)
        if p_dtype is not None:
            p = p.to(p_dtype).to(compute_dtype)
        outs.append(visible_matmul(p, vs.transpose(1, 2), seen).transpose(1, 2))  # (B, Sq, H, D)
        lses.append(lse)
    if cu_q is None:
        out, lse = outs[0], lses[0]
        return (out if spec.layout == "bshd" else out.transpose(1, 2)), lse
    out = torch.cat([o[0] for o in outs], dim=0)  # (tokens, Hq, D)
    lse = torch.cat([x[0] for x in lses], dim=1)  # (Hq, tokens)
    return (out if spec.layout == "bshd" else out.transpose(0, 1)), lse
