"""flash-triton on a GPU (the ``gpu`` tier): determinism, skipped tiles, both load paths, every head dim,
configurations that compile as shipped, and memory safety with bad offsets.

The conformance suite runs the shipped configurations against the float64 oracle at real sizes;
these tests add what only the Triton backend has: TMA descriptors next to pointer loads, tile
shapes from the table, the fallback ladder staying unused, the deterministic path.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import flash
from flash import heuristics, plan
from flash._cache import BoundedCache
from flash.backend import BackwardArgs, ForwardArgs
from flash.heuristics import KernelConfig
from flash.spec import build_spec, canonical, canonical_lse
from flash.testing import Case, assert_within_rule, check_backward, check_forward, dense_attention

pytest.importorskip("triton")

from flash_triton import launch
from flash_triton.backend import TritonBackend

pytestmark = pytest.mark.gpu
BASE = Case("gpu", batch=2, heads_q=8, heads_kv=8, head_dim=128, dtype=torch.bfloat16, seqlen_q=1000, seqlen_k=1000)


def _config(spec, pass_: str, **extra) -> KernelConfig:
    config = heuristics.config_for(TritonBackend(), spec, pass_)
    return KernelConfig.from_json({**config.to_json(), **extra})


def _force(monkeypatch: pytest.MonkeyPatch, **extra) -> None:
    real = heuristics.config_for

    def config_for(backend, spec, pass_):
        config = real(backend, spec, pass_)
        return KernelConfig.from_json({**config.to_json(), **extra}) if backend.name == "triton" else config

    monkeypatch.setattr(heuristics, "config_for", config_for)
    monkeypatch.setattr(plan, "_plans", BoundedCache(16))  # plans hold the configuration they were made with


def test_deterministic_backward_is_bit_identical() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 2048, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))  # fmt: skip
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = flash.attention(q, k, v, causal=True, deterministic=True, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for again in runs[1:]:
        for first, second in zip(runs[0], again):
            assert torch.equal(first, second)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_hidden_tiles_are_never_read(head_dim: int) -> None:
    """NaN in keys hidden from the first query block must not reach it (computed-then-masked tiles would)."""
    seqlen = 1024
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, seqlen, 4, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))  # fmt: skip
    spec = build_spec(q, k, v, causal=True)
    config = heuristics.config_for(TritonBackend(), spec, "forward")
    first_hidden = -(-config.block_m // config.block_n) * config.block_n  # key blocks after the first row block
    clean = flash.attention(q, k, v, causal=True, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, first_hidden:] = float("nan")
    v2[:, first_hidden:] = float("nan")
    dirty = flash.attention(q, k2, v2, causal=True, backend="triton")
    assert torch.equal(dirty[:, : config.block_m], clean[:, : config.block_m])


TMA_CASES = [
    replace(BASE, name="bshd_causal", causal=True),
    replace(BASE, name="bhsd_gqa", layout="bhsd", heads_kv=2),
    replace(BASE, name="varlen_d64", head_dim=64, seqlens=((1000, 1500), (3, 700), (2000, 17)), causal=True),
    replace(BASE, name="window_softcap", window=(200, 30), softcap=20.0),
]


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: c.name)
def test_both_load_paths(monkeypatch: pytest.MonkeyPatch, case: Case, tma: bool, seed: int) -> None:
    _force(monkeypatch, tma=tma)
    check_forward("triton", case, "cuda", seed)
    check_backward("triton", case, "cuda", seed)


def test_packed_qkv_through_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    _force(monkeypatch, tma=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(2, 777, 3, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = flash.attention_qkvpacked(qkv, causal=True, backend="triton")
    q, k, v = qkv.unbind(2)
    spec = build_spec(q, k, v, causal=True)
    oracle, _ = dense_attention(spec, q, k, v)
    naive, _ = dense_attention(spec, q, k, v, compute_dtype=torch.bfloat16)
    assert_within_rule("packed qkv out", out, oracle, naive, torch.bfloat16)


@pytest.mark.parametrize("head_dim", [16, 32, 48, 80, 160, 192])
def test_other_head_dims(head_dim: int, seed: int) -> None:
    case = replace(BASE, name=f"d{head_dim}", head_dim=head_dim, seqlen_q=300, seqlen_k=457, causal=True, heads_kv=2)
    check_forward("triton", case, "cuda", seed)
    check_backward("triton", case, "cuda", seed)


def test_large_scores_stay_finite(seed: int) -> None:
    case = replace(BASE, name="large_scale", scale=3.0, seqlen_q=700, seqlen_k=900)
    check_forward("triton", case, "cuda", seed)
    check_backward("triton", case, "cuda", seed)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_shipped_configurations_compile_as_is(head_dim: int, causal: bool) -> None:
    """The table's configurations must compile on this GPU: the fallback ladder stays unused."""
    launch._working.clear()
    q = torch.randn(2, 512, 2048 // head_dim, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flash-triton", category=RuntimeWarning)
        out = flash.attention(q, q, q, causal=causal, backend="triton")
        out.sum().backward()
        flash.attention(q, q, q, causal=causal, backend="triton", deterministic=True).sum().backward()
    torch.cuda.synchronize()


def test_bad_offsets_stay_inside_the_tensors() -> None:
    """cu_seqlens the spec would reject (unchecked, as under CUDA graph capture) are clamped in the kernels."""
    total, heads, d, guard = 3000, 4, 128, 1 << 16
    cu = torch.tensor([0, -5000, 1 << 30, 1200, 2900, total + 77], dtype=torch.int32, device="cuda")

    def guarded(shape, dtype=torch.bfloat16):
        n = torch.Size(shape).numel()
        buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype, device="cuda")
        return buf[guard : guard + n].view(shape), buf

    (q, _), (k, _), (v, _), (dout, _) = (guarded((total, heads, d)) for _ in range(4))
    for t in (q, k, v, dout):
        t.normal_()
    spec = build_spec(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4096, max_seqlen_k=4096,
                      causal=True, check_values=False)  # fmt: skip
    out, out_buf = guarded((total, heads, d))
    lse, lse_buf = guarded((heads, total), torch.float32)
    launch.forward(spec, ForwardArgs(*(canonical(t, spec) for t in (q, k, v, out)), canonical_lse(lse, spec), cu, cu),
                   _config(spec, "forward"))  # fmt: skip
    grads = [guarded((total, heads, d)) for _ in range(3)]
    out.nan_to_num_(0.0)
    lse.nan_to_num_(0.0)
    args = BackwardArgs(*(canonical(t, spec) for t in (q, k, v, out)), canonical_lse(lse, spec),
                        canonical(dout, spec), *(canonical(g, spec) for g, _ in grads), cu, cu)  # fmt: skip
    launch.backward(spec, args, _config(spec, "backward"))
    torch.cuda.synchronize()
    for view, buf in [(out, out_buf), (lse, lse_buf), *grads]:
        assert buf[:guard].isnan().all() and buf[guard + view.numel() :].isnan().all()
