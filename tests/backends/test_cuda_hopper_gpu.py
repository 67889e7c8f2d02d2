"""Hopper kernel (flash_cuda.hopper), GPU tier: every harness case against the float64 oracle.

Skipped without an sm_90 GPU or without CuPy. The cases, the oracle, the tolerance rule (max error
<= 2 x the naive same-precision error + eps), the guard bands and the bitwise repeat are those of
``packages/flash-cuda/scripts/hopper_check.py``: one source for the device harness and this test.
"""

from __future__ import annotations

import math

import pytest
import torch

hopper = pytest.importorskip("flash_cuda.hopper")

from tests.backends.hopper_harness import load_script, require_hopper  # noqa: E402

pytestmark = pytest.mark.gpu

hc = load_script("hopper_check")


@pytest.fixture(autouse=True)
def _hopper_gpu():
    require_hopper("the Hopper kernel")


@pytest.mark.parametrize("case", hc.check_cases(), ids=lambda c: c.name)
def test_case_against_the_oracle(case, seed):
    entry = hc.check_case(case, seed)
    assert entry["ok"], entry.get("diagnosis", entry)


def test_cuda_graph_replay_on_a_side_stream(seed):
    case = hc.Case("graph", d=128, b=2, sq=700, hq=4, hkv=2, window=(-1, 0))
    prob = hc.make_problem(case, seed)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        hc.run_case(case, prob)  # warm-up: compile and load outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hc.run_case(case, prob)
    for t in (prob["q"], prob["k"], prob["v"]):  # new inputs in place: the replay must see them
        t.copy_(torch.randn_like(t, dtype=torch.float32))
    prob["out"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    scale = 1.0 / math.sqrt(case.d)
    exact_out, _ = hc.dense_reference(prob["q"], prob["k"], prob["v"], case, None, None, scale, torch.float64)
    naive_out, _ = hc.dense_reference(prob["q"], prob["k"], prob["v"], case, None, None, scale, torch.bfloat16)
    limit = 2 * hc.max_error(naive_out, exact_out) + hc.EPS["bf16"]
    assert hc.max_error(prob["out"], exact_out) <= limit
    assert torch.isfinite(prob["lse"]).all()


def test_unsupported_layouts_are_declared():
    q = torch.randn(1, 64, 2, 68, device="cuda", dtype=torch.bfloat16)[..., :64]  # rows of 136 bytes
    out = torch.empty(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 64, device="cuda")
    common = {"seqlen_q": 64, "seqlen_k": 64, "heads_q": 2, "heads_kv": 2, "head_dim": 64, "scale": 0.125}
    reasons = hopper.unsupported_reasons(q, q, q, out, lse, **common)
    assert any("16 bytes" in r for r in reasons), reasons
    good = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert hopper.unsupported_reasons(good, good, good, out, lse, **common) == []
    assert hopper.unsupported_reasons(good.float(), good.float(), good.float(), out, lse, **common)
    assert hopper.unsupported_reasons(good, good, good, out, lse, **{**common, "heads_kv": 3})
