"""The two calls ring attention makes into flash's single-device attention: the one place to
rewire if core's internals change.

Both take canonical ``(batch, seqlen, heads, head_dim)`` views with any strides (unit stride
along head_dim) and pass the mask in the spec's terms; ``backend`` dispatches as usual. With
``cu_seqlens`` the tensors are one packed batch, viewed as batch 1: ``(1, tokens, heads,
head_dim)``, LSE ``(1, heads, tokens)``; queries and keys share the offsets.
"""

from __future__ import annotations

from torch import Tensor

from flash.api import attention
from flash.plan import plan_for, run_backward


def block_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float,
    scale: float,
    deterministic: bool,
    backend: str,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of one block: out in q's dtype, lse (batch, heads_q, seqlen_q) per the LSE contract."""
    if cu_seqlens is not None:
        q, k, v = q[0], k[0], v[0]
    out, lse = attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        return_lse=True,
        deterministic=deterministic,
        backend=backend,
    )
    return (out, lse) if cu_seqlens is None else (out.unsqueeze(0), lse.unsqueeze(0))


def block_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    window: tuple[int, int] | None,
    softcap: float,
    scale: float,
    deterministic: bool,
    backend: str,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block, recomputed from a *given* ``out``/``lse``/``dout``.

    Given the final output and LSE of the rows (not this block's own), the result is this block's
    exact share of the full gradient: ``P = exp(S - lse)`` and ``dS = P (dP - rowsum(dO * O))``
    only involve the row's global quantities.
    """
    packed = cu_seqlens is not None
    if packed:
        dout, q, k, v, out, lse = (t[0] for t in (dout, q, k, v, out, lse))
    plan, spec = plan_for(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None, None, None, "bshd", causal, window, softcap,
        scale, 0.0, None, deterministic, backend, check_values=False,
    )  # fmt: skip
    dq, dk, dv = run_backward(plan, spec, dout, q, k, v, out, lse, cu_seqlens, cu_seqlens)
    return (dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)) if packed else (dq, dk, dv)
