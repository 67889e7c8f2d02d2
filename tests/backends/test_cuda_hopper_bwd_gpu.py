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


def test_dispatch_pairs_the_cuda_forward_with_this_backward():
    import flash

    q, k, v = (torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    explanation = str(flash.explain(q, k, v, causal=True, backend="cuda"))
    backward = explanation[explanation.index("backward:") :]
    assert backward.startswith("backward: cuda"), explanation
