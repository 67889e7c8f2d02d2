"""Hopper backward with ALiBi (flash_cuda.hopper_bwd, ``alibi_slopes``), GPU tier: gradients against the
float64 oracle (core's bias ``-slope |i + off - j|``, flash.terms) with the 2x-naive rule of
``packages/flash-cuda/scripts/hopper_bwd_check.py``, into NaN-poisoned outputs inside guard bands; and
through dispatch (a Triton forward paired with this backward). Skipped without an sm_90 GPU or CuPy.
"""

from __future__ import annotations

import pytest
import torch

hopper_bwd = pytest.importorskip("flash_cuda.hopper_bwd")

from tests.backends.hopper_harness import load_script, require_hopper  # noqa: E402

pytestmark = pytest.mark.gpu

hc = load_script("hopper_bwd_check")


@pytest.fixture(autouse=True)
def _hopper_gpu():
    require_hopper("the Hopper backward")


def _slopes(batch: int, heads: int, per_batch: bool) -> torch.Tensor:
    """The usual ALiBi slopes 2^(-8 (h + 1) / H); per (batch, head): each sequence's scaled differently."""
    base = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], device="cuda")
    if not per_batch:
        return base
    return torch.stack([base * (1 + 0.5 * b) for b in range(batch)])


def _alibi_dense(q, k, v, slopes, window, scale):
    """Dense attention of canonical (b, s, h, d) tensors with ALiBi under causal/window ``(left, 0)``:
    out, lse (rows that see no key: out 0, lse -inf)."""
    b, sq, hq, _ = q.shape
    sk, group = k.shape[1], hq // k.shape[2]
    kk, vv = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    i = torch.arange(sq, device=q.device, dtype=torch.float64)[:, None]
    j = torch.arange(sk, device=q.device, dtype=torch.float64)[None, :]
    rel = j - i - (sk - sq)  # <= 0 where seen (right reach 0)
    seen = rel <= 0
    if window[0] >= 0:
        seen = seen & (rel >= -window[0])
    slope = (slopes.view(1, hq) if slopes.dim() == 1 else slopes).double()[:, :, None, None].expand(b, hq, 1, 1)
    bias = (slope * rel.abs()).to(q.dtype)  # exact positions, rounded once to the scores' type
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale - bias
    s = s.masked_fill(~seen, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    lse = (torch.log(den) + m).squeeze(-1)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


CASES = [
    # (dtype, d, heads_q, heads_kv, sq, sk, window, per (batch, head) slopes)
    ("bf16", 128, 8, 2, 457, 457, (-1, 0), False),
    ("bf16", 128, 4, 4, 333, 700, (-1, 0), True),
    ("bf16", 64, 8, 2, 700, 333, (-1, 0), False),  # rows that see no key
    ("fp16", 64, 4, 1, 257, 513, (-1, 0), True),
    ("fp16", 128, 4, 2, 1000, 1000, (100, 0), False),
    ("bf16", 72, 4, 2, 129, 300, (37, 0), True),  # compiled d128, zero-filled columns
    ("bf16", 128, 2, 2, 1, 1, (-1, 0), False),
    ("bf16", 128, 2, 1, 4100, 4100, (-1, 0), False),  # long: the bias's split stays accurate
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_alibi_against_the_oracle(case):
    dtype_name, d, hq, hkv, sq, sk, window, per_batch = case
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
    g = torch.Generator(device="cuda").manual_seed(11)
    b = 2
    q, do = (torch.randn(b, sq, hq, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    slopes, scale = _slopes(b, hq, per_batch), d**-0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = _alibi_dense(q64, k64, v64, slopes, window, scale)
    exact = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive = torch.autograd.grad(_alibi_dense(qn, kn, vn, slopes, window, scale)[0], (qn, kn, vn), do)
    bufs = [hc.guarded_like(t.contiguous()) for t in (q, k, v)]
    grads = [view for _, view in bufs]
    hopper_bwd.backward(q, k, v, o64.detach().to(dtype), lse64.detach().float(), do, *grads, heads_q=hq,
                        heads_kv=hkv, head_dim=d, window=window, scale=scale, alibi_slopes=slopes)  # fmt: skip
    torch.cuda.synchronize()
    entry: dict = {"ok": True}
    hc.grad_errors(entry, grads, exact, naive, bufs, dtype_name)
    assert entry["ok"], entry


@pytest.mark.parametrize("per_batch", [False, True])
def test_dispatch_pairs_a_forward_with_this_backward_for_causal_alibi(per_batch):
    """flash.attention with causal ALiBi: explain says the backward is cuda's, and the public API's
    gradients (whichever forward dispatch picks, through the LSE contract) pass the 2x-naive rule."""
    import flash

    g = torch.Generator(device="cuda").manual_seed(5)
    b, s, hq, hkv, d = 2, 600, 8, 2, 128
    q, do = (torch.randn(b, s, hq, d, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, s, hkv, d, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    slopes = _slopes(b, hq, per_batch)
    explanation = str(flash.explain(q, k, v, causal=True, alibi_slopes=slopes))
    assert explanation[explanation.index("backward:") :].startswith("backward: cuda"), explanation
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(flash.attention(*leaves, causal=True, alibi_slopes=slopes), leaves, do)
    scale = d**-0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(_alibi_dense(q64, k64, v64, slopes, (-1, 0), scale)[0], (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive = torch.autograd.grad(_alibi_dense(qn, kn, vn, slopes, (-1, 0), scale)[0], (qn, kn, vn), do)
    for name, a, ex, nv in zip(("dq", "dk", "dv"), got, exact, naive):
        err = (a.double() - ex).abs().nan_to_num(float("inf")).max().item()
        limit = 2 * (nv.double() - ex).abs().max().item() + hc.EPS["bf16"]
        assert err <= limit, (name, err, limit)
