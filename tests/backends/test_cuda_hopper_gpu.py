"""Hopper kernel (flash_cuda.hopper), GPU tier: every harness case against the float64 oracle.

Skipped without an sm_90 GPU or without CuPy. The cases, the oracle, the tolerance rule (max error
<= 2 x the naive same-precision error + eps), the guard bands and the bitwise repeat are those of
``packages/flash-cuda/scripts/hopper_check.py``: one source for the device harness and this test.
The fp8 V^T pre-pass alone is compared byte for byte with the harness's torch reference.
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


@pytest.mark.parametrize("dtype", ["bf16", "e4m3"], ids=["bf16", "fp8"])
def test_cuda_graph_replay_on_a_side_stream(seed, dtype):
    """Captured once, replayed on new inputs (fp8: the pre-pass's V^T buffer from the graph's pool)."""
    case = hc.Case("graph", d=128, b=2, sq=700, hq=4, hkv=2, window=(-1, 0), dtype=dtype)
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
    exact_out, _, limit, _ = hc.oracle(case, prob, 1.0 / math.sqrt(case.d))
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


@pytest.mark.parametrize(
    ("case", "keys_past_the_last_sequence"),
    [
        (hc.Case("batch", d=128, b=3, sq=1, sk=517, hq=4, dtype="e4m3"), False),
        (hc.Case("bhsd d64 e5m2", d=64, b=2, sq=1, sk=64, hq=3, layout="bhsd", dtype="e5m2"), False),
        (hc.Case("varlen d256", d=256, varlen=[1] * 5, varlen_k=[130, 0, 1, 260, 33], dtype="e4m3"), False),
        # cu_k stops before the tensor's end: the last sequence's columns run on to the row's end
        (hc.Case("varlen d48 tail", d=48, varlen=[1] * 3, varlen_k=[5, 700, 3000], dtype="e4m3"), True),
    ],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_fp8_v_transpose_prepass_writes_the_reference(case, keys_past_the_last_sequence, seed):
    """flash_fwd_vt's V^T, written over NaN bytes, equals the torch reference byte for byte: every
    column (zeros past each sequence's keys and between sequences), keys permuted per 32-key step."""
    prob = hc.make_problem(case, seed)
    v, cu_k = prob["v"], prob["cu_k"]
    if keys_past_the_last_sequence:
        cu_k = cu_k[:-1]
    sequences = cu_k.numel() - 1 if cu_k is not None else v.shape[0]
    prepass = hopper.plan_vt(v, cu_k is not None, sequences, prob["max_k"], prob["hkv"], case.d, v.get_device())
    vt = torch.full(prepass.shape, 0xFF, dtype=torch.uint8, device=v.device).view(v.dtype)
    hopper.transpose_v_into(prepass, v, cu_k, vt, v.get_device())
    torch.cuda.synchronize()
    expected = hc.vt_reference(v, cu_k, prob["max_k"], prepass.shape)
    assert torch.equal(vt.view(torch.uint8), expected.view(torch.uint8))
