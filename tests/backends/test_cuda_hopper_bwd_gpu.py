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
