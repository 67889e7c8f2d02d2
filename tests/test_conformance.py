"""The cross-backend conformance suite: every registered backend, every spec option, forward and backward.

Each backend runs every case it declares support for and is held to the rule
"max error against the float64 oracle <= 2x the naive same-precision error + eps".
A case a backend declares unsupported is skipped with the backend's own reason,
except for the reference backend, which must support everything.
"""

from __future__ import annotations

import pytest
import torch

from flash.testing import Case, check_backward, check_forward, cpu_cases, declared_reasons, gpu_cases
from tests.conftest import require_usable, seed_for

CPU_CASES = cpu_cases()
GPU_CASES = gpu_cases()


def _run(backend: str, case: Case, device: str, seed: int, pass_: str) -> None:
    require_usable(backend)
    if device == "cuda" and backend == "reference":
        pytest.skip("the reference backend is checked on the CPU tier (pure torch: the same code on any device)")
    if pass_ == "backward" and not case.backward:
        pytest.skip(f"{case.name} has no backward (fp8 is inference-only; NaN inputs poison every gradient)")
    reasons = declared_reasons(backend, case, device, "forward")
    if pass_ == "backward" and not reasons:
        # The backward may come from another backend; what matters is that this forward pairs with one.
        reasons = declared_reasons("reference", case, device, "backward") and declared_reasons(
            backend, case, device, "backward"
        )
    if reasons:
        if backend == "reference":
            pytest.fail(f"the reference backend must support every case; it says: {'; '.join(reasons)}")
        pytest.skip(f"{backend} declares: {'; '.join(reasons)}")
    check = check_forward if pass_ == "forward" else check_backward
    check(backend, case, device, seed)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_forward(backend: str, case: Case, seed: int) -> None:
    _run(backend, case, "cpu", seed, "forward")


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_backward(backend: str, case: Case, seed: int) -> None:
    _run(backend, case, "cpu", seed, "backward")


# GPU tier: one seed per case (not per backend), so every backend meets the same inputs and the
# float64 oracle of a case is computed once (flash.testing keeps the last few); the xdist group
# keeps a case's tests in one worker process when the tier runs in parallel (-n N --dist loadgroup).
GPU_PARAMS = [pytest.param(case, id=case.name, marks=pytest.mark.xdist_group(case.name)) for case in GPU_CASES]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_PARAMS)
def test_forward_gpu(backend: str, case: Case) -> None:
    _run(backend, case, "cuda", seed_for(case.name), "forward")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_PARAMS)
def test_backward_gpu(backend: str, case: Case) -> None:
    _run(backend, case, "cuda", seed_for(case.name), "backward")
    torch.cuda.synchronize()
