"""Hopper backward (flash_cuda.hopper_bwd, issue 14), GPU tier: gradients against the float64 oracle.

Skipped without an sm_90 GPU or without CuPy. The cases, the oracle (float64 autograd of dense
attention), the tolerance rule (max error <= 2 x the naive same-precision error + eps) and the guard
bands are those of ``packages/flash-cuda/scripts/hopper_bwd_check.py``: one source for the device
harness and this test. The conformance suite (tests/test_conformance.py) covers the backward through
dispatch (``backend="cuda"``).
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


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"deterministic": True}], ids=str)
def test_dispatch_pairs_the_cuda_forward_with_this_backward(options):
    import flash

    q, k, v = (torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    explanation = str(flash.explain(q, k, v, causal=True, backend="cuda", **options))
    backward = explanation[explanation.index("backward:") :]
    assert backward.startswith("backward: cuda"), explanation


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
