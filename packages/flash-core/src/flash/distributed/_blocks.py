"""The two calls ring attention makes into flash's single-device attention: the one place to
rewire if core's internals change.

Both take canonical ``(batch, seqlen, heads, head_dim)`` views with any strides (unit stride
along head_dim) and pass the mask in the spec's terms; ``backend`` dispatches as usual.
"""

from __future__ import annotations

from torch import Tensor

from flash import ops
from flash.api import attention
from flash.spec import UNBOUNDED


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
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of one block: out in q's dtype, lse (batch, heads_q, seqlen_q) per the LSE contract."""
    out, lse = attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        return_lse=True,
        deterministic=deterministic,
        backend=backend,
    )
    return out, lse


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
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block, recomputed from a *given* ``out``/``lse``/``dout``.

    Given the final output and LSE of the rows (not this block's own), the result is this block's
    exact share of the full gradient: ``P = exp(S - lse)`` and ``dS = P (dP - rowsum(dO * O))``
    only involve the row's global quantities.
    """
    left, right = window if window is not None else (UNBOUNDED, UNBOUNDED)
    dq, dk, dv = ops.attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        None,
        None,
        None,
        None,
        "bshd",
        causal,
        left,
        right,
        softcap,
        scale,
        0.0,
        None,
        deterministic,
        backend,
    )
    return dq, dk, dv
