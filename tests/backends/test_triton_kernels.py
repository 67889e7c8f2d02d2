"""flash-triton's kernels in Triton's CPU interpreter: tilings, skipped tiles, memory safety.

The conformance suite (``tests/test_conformance.py``) runs every spec option through the table's
configuration; these tests vary what it cannot: the tile shapes and kernel variants (TMA
descriptors, block lists), and they check two properties no tolerance can see:
tiles a mask hides are never read, and no offset in ``cu_seqlens`` makes a kernel touch memory
outside the tensors.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import flash
from flash import heuristics, plan
from flash._cache import BoundedCache
from flash.backend import BackwardArgs, ForwardArgs
from flash.heuristics import KernelConfig
from flash.spec import build_spec, canonical, canonical_lse
from flash.testing import Case, check_backward, check_forward

pytest.importorskip("triton")

from flash_triton import launch, runtime

pytestmark = pytest.mark.skipif(
    not runtime.interpreting() or runtime.mode_mismatch() is not None,
    reason="CPU tier: needs TRITON_INTERPRET=1 set before Python starts (as nox sets it without a GPU)",
)


def use_config(monkeypatch: pytest.MonkeyPatch, forward: dict, backward: dict) -> None:
    """Make the triton backend use these configurations instead of the table's."""
    real = heuristics.config_for

    def config_for(backend, spec, pass_):
        if backend.name != "triton":
            return real(backend, spec, pass_)
        return KernelConfig.from_json(forward if pass_ == "forward" else backward)

    monkeypatch.setattr(heuristics, "config_for", config_for)
    monkeypatch.setattr(plan, "_plans", BoundedCache(16))  # plans hold the configuration they were made with


FWD = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1}
BWD = {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}
TILINGS = {
    "square16": ({**FWD, "block_m": 16}, {**BWD, "block_n": 16, "dq_block_m": 16, "dq_block_n": 16}),
    "wide": ({**FWD, "block_m": 16, "block_n": 64}, {**BWD, "block_m": 32, "block_n": 16, "dq_block_n": 64}),
    "tma": ({**FWD, "tma": True}, {**BWD, "tma": True, "dq_block_m": 32, "dq_block_n": 16}),
}
CASES = {
    "gqa_causal_bf16": Case("gqa_causal_bf16", heads_q=4, heads_kv=2, head_dim=32, causal=True, dtype=torch.bfloat16,
                            seqlen_q=33, seqlen_k=40, batch=1),
    "window_bhsd": Case("window_bhsd", layout="bhsd", head_dim=64, window=(9, 4), seqlen_q=30, seqlen_k=41,
                        softcap=4.0, heads_q=2, heads_kv=2, batch=1),
    "varlen": Case("varlen", head_dim=64, seqlens=((20, 33), (0, 9), (35, 18), (7, 0)), causal=True, heads_q=2,
                   heads_kv=1),
    "dropout_mqa": Case("dropout_mqa", head_dim=64, dropout_p=0.25, seqlen_q=30, seqlen_k=37, heads_q=2, heads_kv=1,
                        batch=1),
}  # fmt: skip
RUNS = [
    ("square16", "gqa_causal_bf16"),
    ("wide", "window_bhsd"),
    ("tma", "varlen"),
    ("tma", "window_bhsd"),
    ("square16", "dropout_mqa"),
]


@pytest.mark.parametrize(("tiling", "case"), RUNS, ids=[f"{t}-{c}" for t, c in RUNS])
def test_tilings_match_the_oracle(monkeypatch: pytest.MonkeyPatch, tiling: str, case: str, seed: int) -> None:
    use_config(monkeypatch, *TILINGS[tiling])
    check_forward("triton", CASES[case], "cpu", seed)
    check_backward("triton", replace(CASES[case], deterministic=True), "cpu", seed)


def test_tma_descriptors_are_used_where_they_can_be(monkeypatch: pytest.MonkeyPatch) -> None:
    from flash_triton import tma

    made = []
    real = tma.descriptor
    monkeypatch.setattr(tma, "descriptor", lambda *a: made.append(a[1]) or real(*a))
    use_config(monkeypatch, *TILINGS["tma"])
    q = torch.randn(2, 40, 4, 64, dtype=torch.float16, requires_grad=True)
    flash.attention(q, q, q, causal=True).sum().backward()
    assert len(made) == 6  # K and V (forward), Q and dO (dK/dV), K and V (dQ)
    made.clear()
    odd = torch.randn(2, 40, 4, 40, dtype=torch.float16)  # head dim 40: pointer loads only
    flash.attention(odd, odd, odd)
    assert made == []


# ----------------------------------------------------------------------------- hidden tiles


def _poison(t: torch.Tensor, rows: slice) -> torch.Tensor:
    t = t.clone()
    t[:, rows] = float("nan")
    return t


@pytest.mark.parametrize("mask", ["causal", "window"])
def test_forward_never_reads_hidden_tiles(monkeypatch: pytest.MonkeyPatch, mask: str) -> None:
    """Keys 32..63 are hidden from every query of block 0 (rows 0..31): NaN there must not reach those rows.

    A kernel that computed hidden tiles and masked them afterwards would multiply the NaN values
    by a zero probability and get NaN.
    """
    use_config(monkeypatch, {**FWD, "block_m": 32, "block_n": 16}, BWD)
    options = {"causal": True} if mask == "causal" else {"window": (-1, 0)}
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16) for _ in range(3))
    clean = flash.attention(q, k, v, backend="triton", **options)
    dirty = flash.attention(q, _poison(k, slice(32, 64)), _poison(v, slice(32, 64)), backend="triton", **options)
    assert torch.equal(dirty[:, :32], clean[:, :32])
    assert dirty[:, 32:].isnan().all()


def test_sliding_window_skips_tiles_on_the_left(monkeypatch: pytest.MonkeyPatch) -> None:
    use_config(monkeypatch, {**FWD, "block_m": 16, "block_n": 16}, BWD)
    q, k, v = (torch.randn(1, 80, 2, 32, dtype=torch.float16) for _ in range(3))
    options = {"window": (15, 0)}  # rows 48..63 see keys 33..63: key block 16..31 is hidden from them
    clean = flash.attention(q, k, v, backend="triton", **options)
    dirty = flash.attention(q, _poison(k, slice(16, 32)), _poison(v, slice(16, 32)), backend="triton", **options)
    assert torch.equal(dirty[:, 48:], clean[:, 48:])


def test_backward_never_reads_hidden_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """With causal masking, query block 0..15 is hidden from key blocks 16.. : NaN in those queries
    (and their output gradients) must not reach dK/dV of keys 16.. nor dQ of queries 16.."""
    use_config(monkeypatch, FWD, {**BWD, "block_m": 16, "block_n": 16, "dq_block_m": 16, "dq_block_n": 16})
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16) for _ in range(3))
    dout = torch.randn(1, 64, 2, 32, dtype=torch.float16)
    spec = build_spec(q, k, v, causal=True)
    out = torch.empty_like(q)
    lse = torch.empty(spec.lse_shape())
    launch.forward(spec, ForwardArgs(q, k, v, out, lse), KernelConfig.from_json(FWD))

    def grads(q_in, dout_in):
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        args = BackwardArgs(q_in, k, v, out, lse, dout_in, dq, dk, dv)
        launch.backward(spec, args, KernelConfig.from_json({**BWD, "block_m": 16, "block_n": 16, "dq_block_m": 16,
                                                            "dq_block_n": 16}))  # fmt: skip
        return dq, dk, dv

    clean = grads(q, dout)
    dirty = grads(_poison(q, slice(0, 16)), _poison(dout, slice(0, 16)))
    assert torch.equal(dirty[0][:, 16:], clean[0][:, 16:])
    assert torch.equal(dirty[1][:, 16:], clean[1][:, 16:]) and torch.equal(dirty[2][:, 16:], clean[2][:, 16:])
    assert dirty[1][:, :16].isnan().any()


# ----------------------------------------------------------------------------- memory safety


def _guarded(shape: tuple[int, ...], dtype: torch.dtype, guard: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor of ``shape`` in the middle of a NaN-filled buffer; returns (view, whole buffer)."""
    n = torch.Size(shape).numel()
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    view = buf[guard : guard + n].view(shape)
    return view, buf


@pytest.mark.parametrize(
    "offsets",
    [[0, -40, 10_000, 3, 200], [5, 3, 1, 0, 2], [0, 2**30, -(2**30), 60, 60]],
    ids=["out_of_range", "decreasing", "huge"],
)
def test_garbage_cu_seqlens_stay_inside_the_tensors(offsets: list[int]) -> None:
    """Offsets the spec would reject (here unchecked, as while capturing a CUDA graph) are clamped in the
    kernels: reads stay inside q/k/v (the NaN guards around them never reach a result) and writes inside
    out/lse/dq/dk/dv (the guards stay untouched)."""
    total, heads, d = 60, 2, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (_guarded((total, heads, d), torch.float16)[0] for _ in range(4))
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape, generator=gen))
    cu = torch.tensor(offsets, dtype=torch.int32)
    spec = build_spec(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True,
                      check_values=False)  # fmt: skip
    out, out_buf = _guarded((total, heads, d), torch.float16)
    lse, lse_buf = _guarded((heads, total), torch.float32)
    launch.forward(spec, ForwardArgs(*(canonical(t, spec) for t in (q, k, v, out)), canonical_lse(lse, spec), cu, cu),
                   KernelConfig.from_json(FWD))  # fmt: skip
    for buf, view in ((out_buf, out), (lse_buf, lse)):
        assert buf[:4096].isnan().all() and buf[4096 + view.numel() :].isnan().all()
    written = ~out.isnan().all(dim=-1).all(dim=-1)
    assert not out[written].isnan().any()  # every row a program wrote came from in-bounds data
    grads = [_guarded((total, heads, d), torch.float16) for _ in range(3)]
    lse_filled = torch.where(lse.isnan(), torch.zeros_like(lse), lse)
    out_filled = torch.where(out.isnan(), torch.zeros_like(out), out)
    launch.backward(
        spec,
        BackwardArgs(*(canonical(t, spec) for t in (q, k, v, out_filled)), canonical_lse(lse_filled, spec),
                     canonical(dout, spec), *(canonical(g, spec) for g, _ in grads), cu, cu),
        KernelConfig.from_json(BWD),
    )  # fmt: skip
    for view, buf in grads:
        assert buf[:4096].isnan().all() and buf[4096 + view.numel() :].isnan().all()
