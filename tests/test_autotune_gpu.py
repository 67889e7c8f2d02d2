"""Autotune mode on the GPU: every kernel backend times its candidates, caches winners, stays exact."""

from __future__ import annotations

import json

import pytest
import torch

import flash
from flash.heuristics import autotune
from flash.registry import REGISTRY
from flash.testing import Case, check_forward


@pytest.mark.gpu
@pytest.mark.long
def test_autotune_on_the_gpu(backend, tmp_path, monkeypatch):
    if backend == "reference" or REGISTRY.unavailable_reasons(backend):
        pytest.skip(f"{backend}: not a usable kernel backend here")
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune.forget()
    chosen = REGISTRY.get(backend)
    every = chosen.tuning_candidates
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    if not any(every(flash.build_spec(q, k, v, causal=True), p) for p in ("forward", "backward")):
        pytest.skip(f"{backend} has nothing to tune for this problem on this GPU (e.g. cuda's Hopper kernels)")
    # Two candidates per pass prove the mechanism; timing all of them would cost minutes of compiles.
    monkeypatch.setattr(chosen, "tuning_candidates", lambda spec, pass_: every(spec, pass_)[:2])
    out = flash.attention(q, k, v, causal=True, backend=backend)
    out.sum().backward()
    torch.cuda.synchronize()
    winners = json.loads((tmp_path / "autotune.json").read_text())["winners"]
    mine = {key: row for key, row in winners.items() if f"| {backend} |" in key}
    assert mine, winners.keys()
    for row in mine.values():
        timed = [ms for ms in row["candidates"].values() if isinstance(ms, float)]
        assert timed and row["milliseconds"] == min(timed), row
    # with the winners in place, results still hold to the rule
    case = Case("autotuned", batch=2, seqlen_q=1000, seqlen_k=1000, heads_q=8, heads_kv=8, head_dim=128,
                dtype=torch.bfloat16, causal=True)  # fmt: skip
    check_forward(backend, case, "cuda", seed=7)
