"""CUDA backend, GPU tier: correctness against the float64 oracle, CUDA graphs, streams, the disk cache.

Skipped without a GPU (the ``gpu`` marker) or when the backend is unusable (no CuPy, old GPU).
Failures print which rows are wrong, so that one device run is enough to locate a bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch

pytest.importorskip("flash_cuda")

import flash
from flash.backend import ForwardArgs
from flash.reference import dense_attention
from flash.registry import REGISTRY
from flash.spec import AttentionSpec, canonical, canonical_lse
from flash.testing import Case, check_backward, check_forward, cpu_cases, declared_reasons, make_inputs
from flash.testing.cases import Inputs
from flash.testing.conformance import naive_dtype, poisoned_outputs, spec_of
from flash.testing.tolerance import EPSILON, FACTOR, max_error
from flash_cuda import launch, tune, variants
from tests.conftest import seed_for

pytestmark = pytest.mark.gpu
NAME = "cuda"


@pytest.fixture(autouse=True)
def _usable():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reasons = REGISTRY.unavailable_reasons(NAME)
    if reasons:
        pytest.skip(f"cuda backend unusable: {'; '.join(reasons)}")


def _diagnose(what: str, got: torch.Tensor, exact: torch.Tensor, limit: float) -> str:
    """Which (batch, row, head) entries are off, for the failure message."""
    g, e = got.detach().double().cpu(), exact.detach().double().cpu()
    bad_nan = torch.isnan(g) & ~torch.isnan(e)
    err = (g - e).abs().nan_to_num(float("inf"))
    err[torch.isinf(e) & (g == e)] = 0.0
    bad = (err > limit) | bad_nan
    if not bad.any():
        return f"{what}: ok"
    idx = bad.nonzero()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} entries off (limit {limit:.3e}); first ones:"]
    for row in idx[:8].tolist():
        lines.append(f"  at {tuple(row)}: got {g[tuple(row)].item():.6g}, expected {e[tuple(row)].item():.6g}")
    if g.dim() >= 3:
        rows = sorted({tuple(r[:2]) for r in idx.tolist()})
        lines.append(f"  distinct leading indices: {rows[:20]}{' ...' if len(rows) > 20 else ''}")
    return "\n".join(lines)


Oracle = tuple[tuple[torch.Tensor, torch.Tensor], float, float]  # float64 (out, lse), limits of out and LSE
_oracles: OrderedDict[tuple[Case, int], Oracle] = OrderedDict()


def _oracle(case: Case, seed: int, inputs: Inputs, spec: AttentionSpec) -> Oracle:
    """The float64 (out, lse) of a case's inputs and the rule's limits on out and LSE errors, computed
    once per (case, seed) in this process: the tuning-candidate sweep checks many kernels on one input."""
    key = (case, seed)
    if key not in _oracles:
        tensors = {n: inputs.options[n] for n in ("cu_seqlens_q", "cu_seqlens_k") if n in inputs.options}
        exact = dense_attention(spec, inputs.q, inputs.k, inputs.v, **tensors)
        naive = dense_attention(spec, inputs.q, inputs.k, inputs.v, compute_dtype=naive_dtype(case.dtype), **tensors)
        limits = [FACTOR * max_error(n, e) + EPSILON[case.dtype] for n, e in zip(naive, exact)]
        _oracles[key] = (exact, limits[0], limits[1])
        while len(_oracles) > 16:
            _oracles.popitem(last=False)
    return _oracles[key]


def _check(case: Case, seed: int, variant: variants.Variant | None = None) -> tuple[float, float]:
    """Run ``case`` (through flash.attention, or one explicit variant) and compare with the oracle."""
    inputs = make_inputs(case, "cuda", seed)
    spec = spec_of(inputs)
    if variant is None:
        with poisoned_outputs():
            out, lse = flash.attention(inputs.q, inputs.k, inputs.v, backend=NAME, return_lse=True, **inputs.options)
    else:
        out = torch.full_like(inputs.q, float("nan"))
        lse = torch.full(spec.lse_shape(), float("nan"), device="cuda")
        args = ForwardArgs(
            canonical(inputs.q, spec), canonical(inputs.k, spec), canonical(inputs.v, spec), canonical(out, spec),
            canonical_lse(lse, spec), inputs.options.get("cu_seqlens_q"), inputs.options.get("cu_seqlens_k"),
        )  # fmt: skip
        launch.forward(spec, args, variant)
    torch.cuda.synchronize()
    (exact_out, exact_lse), limit_out, limit_lse = _oracle(case, seed, inputs, spec)
    err_out, err_lse = max_error(out, exact_out), max_error(lse, exact_lse)
    label = case.name + (f" [{variant.label()}]" if variant else "")
    print(f"{label}: out err {err_out:.3e} (limit {limit_out:.3e}), lse err {err_lse:.3e} (limit {limit_lse:.3e})")
    if not (err_out <= limit_out and err_lse <= limit_lse):
        raise AssertionError(
            f"{label} (seed {seed}):\n"
            + _diagnose("out", out, exact_out, limit_out)
            + "\n"
            + _diagnose("lse", lse, exact_lse, limit_lse)
        )
    return err_out, err_lse


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("case", cpu_cases(), ids=lambda c: c.name)
def test_small_conformance_cases_on_the_gpu(case: Case, seed: int):
    """The CPU tier's catalogue (every option, odd tiny shapes), run on the GPU."""
    reasons = declared_reasons(NAME, case, "cuda", "forward")
    if reasons:
        pytest.skip("; ".join(reasons))
    check_forward(NAME, case, "cuda", seed)


BASE = Case("odd", batch=2, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16)
ODD_LENGTHS = [(1, 1), (17, 1), (1, 130), (63, 65), (64, 64), (127, 129), (200, 77), (77, 200), (513, 1025)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256, 40, 16, 160])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_odd_lengths(dtype, head_dim, causal, seed):
    for sq, sk in ODD_LENGTHS:
        case = replace(BASE, name=f"d{head_dim}_{sq}x{sk}", dtype=dtype, head_dim=head_dim, causal=causal,
                       seqlen_q=sq, seqlen_k=sk)  # fmt: skip
        _check(case, seed + sq)


@pytest.mark.parametrize(
    "case",
    [
        replace(BASE, name="mqa_d128", heads_q=8, heads_kv=1, head_dim=128, causal=True, seqlen_q=700, seqlen_k=700),
        replace(BASE, name="gqa_bhsd_strided", layout="bhsd", strided=True, head_dim=128, seqlen_q=333, seqlen_k=444),
        replace(BASE, name="strided_causal", strided=True, causal=True, seqlen_q=300, seqlen_k=301),
        replace(BASE, name="window", window=(100, 20), seqlen_q=600, seqlen_k=650, head_dim=128),
        replace(BASE, name="window_causal_left", window=(64, 0), causal=True, seqlen_q=500, seqlen_k=500),
        replace(BASE, name="window_beyond", window=(3, 200), seqlen_q=400, seqlen_k=100),
        replace(BASE, name="varlen", seqlens=((1, 1), (300, 900), (513, 17), (0, 5), (129, 128), (7, 0))),
        replace(BASE, name="varlen_causal", head_dim=128, causal=True, seqlens=((1000, 1000), (1, 400), (333, 222))),
        replace(BASE, name="scale", scale=0.05, head_dim=128, seqlen_q=256, seqlen_k=256),
        replace(BASE, name="causal_more_queries", causal=True, seqlen_q=300, seqlen_k=100, head_dim=128),
        replace(BASE, name="big_values", scale=1.0, seqlen_q=128, seqlen_k=1000),
    ],
    ids=lambda c: c.name,
)
def test_options(case, seed):
    reasons = declared_reasons(NAME, case, "cuda", "forward")
    assert not reasons, reasons
    _check(case, seed)


CANDIDATE_CASES = [
    replace(BASE, name="cand_full", seqlen_q=333, seqlen_k=517),
    replace(BASE, name="cand_causal", causal=True, seqlen_q=517, seqlen_k=333),
    replace(BASE, name="cand_causal_sq", causal=True, seqlen_q=640, seqlen_k=640, heads_q=2, heads_kv=1),
    replace(BASE, name="cand_window", window=(40, 7), seqlen_q=300, seqlen_k=310),
]


@pytest.mark.parametrize(
    "d_config",
    [(d, c) for d, configs in tune.CANDIDATES.items() for c in configs],
    ids=lambda dc: f"d{dc[0]}-" + "-".join(f"{k}{v}" for k, v in dc[1].to_json().items()),
)
def test_every_tuning_candidate(d_config):
    """Every variant the tuner may pick is correct, not only the table's. The candidates of a head dim
    share their inputs (a seed per case and head dim), so a worker computes each oracle once."""
    d, config = d_config
    arch = variants.nvrtc_arch(torch.cuda.get_device_capability())
    for base in CANDIDATE_CASES:
        case = replace(base, head_dim=d)
        spec = spec_of(make_inputs(case, "cuda", 0))
        mask = variants.mask_kind(spec.mask_bounds, spec.masked)
        _check(case, seed_for(f"tuning candidates {case}"), variants.make_variant(config, d, True, mask, arch))


# ----------------------------------------------------------------------------- contracts


def test_rows_that_see_no_key_are_zero_with_lse_minus_inf(seed):
    case = replace(BASE, name="no_key", causal=True, seqlen_q=300, seqlen_k=100, head_dim=128)
    inputs = make_inputs(case, "cuda", seed)
    out, lse = flash.attention(inputs.q, inputs.k, inputs.v, backend=NAME, return_lse=True, **inputs.options)
    hidden = 300 - 100  # rows i < sq - sk see no key under bottom-right causal
    assert torch.equal(out[:, :hidden], torch.zeros_like(out[:, :hidden]))
    assert torch.isneginf(lse[:, :, :hidden]).all() and torch.isfinite(lse[:, :, hidden:]).all()


def test_deterministic_bitwise(seed):
    case = replace(BASE, name="det", causal=True, seqlen_q=1000, seqlen_k=1000, head_dim=128)
    inputs = make_inputs(case, "cuda", seed)
    first = flash.attention(inputs.q, inputs.k, inputs.v, backend=NAME, **inputs.options)
    second = flash.attention(inputs.q, inputs.k, inputs.v, backend=NAME, **inputs.options)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "case",
    [
        replace(BASE, name="bwd_causal_gqa", causal=True, seqlen_q=257, seqlen_k=257),
        replace(BASE, name="bwd_d128_odd", head_dim=128, seqlen_q=100, seqlen_k=333),
    ],
    ids=lambda c: c.name,
)
def test_gradients_through_another_backends_backward(case, seed):
    """No CUDA backward: core pairs this forward's LSE with another backend's backward."""
    check_backward(NAME, case, "cuda", seed)


# ----------------------------------------------------------------------------- streams and graphs


def test_runs_on_the_callers_stream(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, 2048, 8, 128)
    src = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    q, k, v = (torch.zeros_like(t) for t in src)
    flash.attention(q, k, v, backend=NAME)  # compile outside the timed region
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms: the kernel must wait for the copies below, on this stream
        for dst, s in zip((q, k, v), src):
            dst.copy_(s)
        out = flash.attention(q, k, v, backend=NAME)
    torch.cuda.synchronize()
    expected = flash.attention(*src, backend=NAME)
    assert torch.equal(out, expected), "the kernel did not run on the caller's stream"


def test_cuda_graph_capture_and_replay(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, 777, 8, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            flash.attention(q, k, v, causal=True, backend=NAME)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash.attention(q, k, v, causal=True, backend=NAME)
    for step in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = flash.attention(q, k, v, causal=True, backend=NAME)
        assert torch.equal(static_out, eager), f"replay {step} differs from eager"
    spec = flash.build_spec(q, k, v, causal=True)
    exact, _ = dense_attention(spec, q, k, v)
    assert (static_out.double() - exact).abs().max().item() < 2e-2


_CHILD = textwrap.dedent(
    """
    import json, os, time
    import torch, flash
    from flash.reference import dense_attention
    import cupy.cuda.compiler as cc
    calls = []
    # CuPy 14 compiles through _compile_using_nvrtc_no_warning; older ones through compile_using_nvrtc.
    for name in ("_compile_using_nvrtc_no_warning", "compile_using_nvrtc"):
        if hasattr(cc, name):
            def counting(*args, _original=getattr(cc, name), **kwargs):
                calls.append(1)
                return _original(*args, **kwargs)
            setattr(cc, name, counting)
            break
    q = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    out = flash.attention(q, q, q, causal=True, backend="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    spec = flash.build_spec(q, q, q, causal=True)
    exact, _ = dense_attention(spec, q, q, q)
    print(json.dumps({"compiles": len(calls), "seconds": seconds,
                      "error": (out.double() - exact).abs().max().item()}))
    """
)


@pytest.mark.long
def test_a_second_process_loads_the_kernel_from_cupys_disk_cache(tmp_path):
    cache = tmp_path / "cupy-cache"
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache))

    def child() -> dict:
        run = [sys.executable, "-c", _CHILD]
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def snapshot() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} if cache.exists() else {}

    first = child()
    after_first = snapshot()
    second = child()
    print(f"first process: {first}; second process: {second}; cache files: {sorted(after_first)}")
    assert any(name.endswith(".cubin") for name in after_first), "CuPy wrote no cubin to its disk cache"
    assert first["error"] < 2e-2 and second["error"] < 2e-2
    assert snapshot() == after_first, "the second process rewrote the disk cache: it compiled again"
    assert second["compiles"] == 0, "the second process called NVRTC for the kernel"
