"""Hopper backward (flash_cuda.hopper_bwd, issue 14), GPU tier: gradients against the float64 oracle.

Skipped without an sm_90 GPU or without CuPy. The cases, the oracle (float64 autograd of dense
attention), the tolerance rule (max error <= 2 x the naive same-precision error + eps) and the guard
bands are those of ``packages/flash-cuda/scripts/hopper_bwd_check.py``: one source for the device
harness and this test. The conformance suite (tests/test_conformance.py) covers the backward through
dispatch (``backend="cuda"``). Packed (varlen) batches are also checked against the same sequences run
one by one at fixed length.
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


@pytest.mark.parametrize("case", hc.check_cases(), ids=lambda c: c.name)
def test_case_against_the_oracle(case, seed):
    entry = hc.check_case(case, seed)
    assert entry["ok"], entry


@pytest.mark.parametrize("case", hc.varlen_cases(), ids=lambda c: c.name)
def test_varlen_case_against_the_oracle_and_one_by_one(case, seed):
    entry = hc.check_varlen_case(case, seed)
    assert entry["ok"], entry


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"deterministic": True}], ids=str)
def test_dispatch_pairs_the_cuda_forward_with_this_backward(options):
    import flash

    q, k, v = (torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    explanation = str(flash.explain(q, k, v, causal=True, backend="cuda", **options))
    backward = explanation[explanation.index("backward:") :]
    assert backward.startswith("backward: cuda"), explanation


def test_varlen_through_the_api_runs_this_backward():
    """flash.attention on a packed batch with backend="cuda": dispatch chooses this backward, and its
    gradients match the same sequences' one by one."""
    import flash

    lengths = [100, 0, 257]
    cu = torch.tensor(hc.offsets(lengths), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 4, 64, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    explanation = str(flash.explain(q, k, v, causal=True, backend="cuda", **varlen))
    assert explanation[explanation.index("backward:") :].startswith("backward: cuda"), explanation
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash.attention(*leaves, causal=True, backend="cuda", **varlen)
    dout = torch.randn(out.shape, generator=g, device="cuda").to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    for a, b in zip(hc.offsets(lengths), hc.offsets(lengths)[1:]):
        if a == b:
            continue
        alone = [t[a:b].clone().unsqueeze(0).requires_grad_() for t in (q, k, v)]
        one = flash.attention(*alone, causal=True, backend="cuda")
        # the forwards and dQ's fp32 reductions may differ in the last bits; the wiring would not
        for packed, single in zip(grads, torch.autograd.grad(one, alone, dout[a:b].unsqueeze(0))):
            torch.testing.assert_close(packed[a:b], single[0], rtol=1e-2, atol=2e-2)


def test_deterministic_gradients_through_the_public_api_are_bit_identical():
    """flash.attention(deterministic=True, backend="cuda"): the backend hands the flag to this kernel
    (dQ of a GQA causal problem, many key blocks per query block, bit for bit the same five times)."""
    import flash

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 1000, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))  # fmt: skip
    do = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    runs = []
    for _ in range(5):
        out = flash.attention(q, k, v, causal=True, softcap=20.0, deterministic=True, backend="cuda")
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for grads in runs[1:]:
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(grads, runs[0]))


@pytest.mark.parametrize("forward", ["cuda", "triton", "reference"])
def test_this_backward_after_each_forward(forward):
    """Cross-pairing through the LSE contract: out and LSE from ``forward``'s kernel (public API), the
    gradients from this backward, against the float64 oracle with the tolerance rule (GQA 8/2, causal,
    odd lengths, d128). The reverse pairing (another backward after the cuda forward) is what dispatch
    does for what this backward declines (test_dispatch_pairs_the_cuda_forward_with_this_backward)."""
    import flash

    g = torch.Generator(device="cuda").manual_seed(3)
    b, sq, sk, hq, hkv, d = 2, 333, 457, 8, 2, 128
    q = torch.randn(b, sq, hq, d, generator=g, device="cuda").to(torch.bfloat16)
    k, v = (torch.randn(b, sk, hkv, d, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    do = torch.randn(b, sq, hq, d, generator=g, device="cuda").to(torch.bfloat16)
    scale, window = d**-0.5, (-1, 0)
    out, lse = flash.attention(q, k, v, causal=True, return_lse=True, backend=forward)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    hopper_bwd.backward(q, k, v, out, lse.float(), do, dq, dk, dv, heads_q=hq, heads_kv=hkv, head_dim=d,
                        window=window, scale=scale)  # fmt: skip
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(hc.dense(q64, k64, v64, window, scale)[0], (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive = torch.autograd.grad(hc.dense(qn, kn, vn, window, scale)[0], (qn, kn, vn), do)
    for name, got, ex, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), exact, naive):
        err = (got.double() - ex).abs().nan_to_num(float("inf")).max().item()
        limit = 2 * (nv.double() - ex).abs().max().item() + hc.EPS["bf16"]
        assert err <= limit, (forward, name, err, limit)


def _masked_dense(q, k, v, seen, scale):
    """Dense attention of canonical (b, s, h, d) tensors under a boolean (b|1, sq, sk) mask: out, lse."""
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = s.masked_fill(~seen[:, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    lse = (torch.log(den) + m).squeeze(-1)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


def _padding(kind: str, b: int, sk: int) -> torch.Tensor:
    keys = torch.arange(sk, device="cuda")
    rows = {
        "right": [keys < sk - 37, keys < sk],
        "left": [keys >= 50, keys >= 1],
        "holes": [torch.rand(sk, device="cuda", generator=torch.Generator("cuda").manual_seed(5)) < 0.6, keys < 9],
        "empty": [keys < 0, keys < sk - 200],
    }[kind]
    return torch.stack(rows[:b]).view(b, 1, 1, sk)


def _intervals(kind: str, sq: int) -> torch.Tensor:
    i = torch.arange(sq, device="cuda")
    if kind == "documents":  # causal documents of 100, 33, 250, ... tokens
        starts = torch.tensor([0, 100, 133, 383, 400], device="cuda")
        lo = starts[torch.searchsorted(starts, i, right=True) - 1]
        hi = i + 1
    else:  # prefix-LM: the first 150 tokens see each other, the rest causally
        lo, hi = torch.zeros_like(i), torch.maximum(i + 1, torch.full_like(i, 150))
    return torch.stack((lo, hi))[None].to(torch.int32)


MASK_CASES = [
    (kind, d, hq, hkv, window)
    for kind in ("right", "left", "holes", "empty", "documents", "prefix")
    for d, hq, hkv in ((64, 4, 2), (128, 2, 2))
    for window in ((-1, -1), (-1, 0))
]


@pytest.mark.parametrize("kind, d, hq, hkv, window", MASK_CASES)
def test_extra_masks_against_the_oracle(kind, d, hq, hkv, window):
    """A key-padding mask (right, left, holes, a sequence that sees nothing) or key intervals (causal
    documents, prefix-LM) with and without causal, odd sizes, GQA: gradients against the float64
    oracle with the 2x-naive rule, into NaN-poisoned outputs inside guard bands."""
    g = torch.Generator(device="cuda").manual_seed(7)
    b, sq, sk = 2, 457, 457
    q, do = (torch.randn(b, sq, hq, d, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    j, i = torch.arange(sk, device="cuda")[None, :], torch.arange(sq, device="cuda")[:, None]
    causal = (j - i - (sk - sq) <= 0) if window[1] == 0 else torch.ones(sq, sk, dtype=torch.bool, device="cuda")
    padding = intervals = None
    if kind in ("documents", "prefix"):
        intervals = _intervals(kind, sq)
        seen = (j >= intervals[0, 0][:, None]) & (j < intervals[0, 1][:, None])
        seen = seen[None].expand(b, sq, sk)
    else:
        padding = _padding(kind, b, sk)
        seen = padding[:, 0, 0][:, None, :].expand(b, sq, sk)
    seen = seen & causal
    scale = d**-0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = _masked_dense(q64, k64, v64, seen, scale)
    exact = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive = torch.autograd.grad(_masked_dense(qn, kn, vn, seen, scale)[0], (qn, kn, vn), do)
    bufs = [hc.guarded_like(t.contiguous()) for t in (q, k, v)]
    grads = [view for _, view in bufs]
    hopper_bwd.backward(q, k, v, o64.detach().to(q.dtype), lse64.detach().float(), do, *grads, heads_q=hq,
                        heads_kv=hkv, head_dim=d, window=window, scale=scale, key_padding=padding,
                        key_intervals=intervals)  # fmt: skip
    torch.cuda.synchronize()
    entry: dict = {"ok": True}
    hc.grad_errors(entry, grads, exact, naive, bufs, "bf16")
    assert entry["ok"], entry


@pytest.mark.parametrize("kind", ["padding", "documents"])
def test_dispatch_runs_this_backward_for_the_extra_masks(kind):
    import flash

    q, k, v = (torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if kind == "padding":
        options = {"attn_mask": (torch.arange(300, device="cuda") < 250).view(1, 1, 1, 300).expand(2, 1, 1, 300)}
    else:
        ids = (torch.arange(300, device="cuda") // 70).to(torch.int32)[None]
        options = {"block_mask": flash.BlockMask.from_document_ids(ids, causal=True)}
    explanation = str(flash.explain(q, k, v, backend="cuda", **options))
    assert explanation[explanation.index("backward:") :].startswith("backward: cuda"), explanation
