"""The per-GPU configuration table, its shared-memory check, and autotuning's JSON cache."""

from __future__ import annotations

import json

import pytest
import torch

import flash
from flash import heuristics
from flash.heuristics import KernelConfig, autotune, smem
from flash.registry import REGISTRY

ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1, "fp32": 4, "fp64": 8}


@pytest.mark.parametrize(
    "entry", list(heuristics.table().values()), ids=lambda e: "/".join(map(str, e.key.__dict__.values()))
)
def test_every_entry_fits_its_gpu_and_says_where_it_came_from(entry):
    key, provenance = entry.key, entry.provenance
    assert provenance.kind in ("measured", "published", "unmeasured") and provenance.note
    if provenance.kind == "measured":
        assert provenance.gpu and provenance.date and provenance.versions, entry
    if key.arch in smem.MAX_SMEM_PER_BLOCK:
        budget = smem.budget(entry.config, key.arch, key.head_dim, ELEMENT_BYTES[key.dtype], key.pass_)
        assert budget.fits, f"{key}: needs {budget.needed} bytes of shared memory, {key.arch} has {budget.available}"


def test_every_installed_kernel_backend_has_configs_for_hopper_and_ampere():
    for name in REGISTRY.names():
        if name == "reference":
            continue
        for arch in ("sm_80", "sm_90"):
            for d in (64, 128):
                assert heuristics.lookup(name, arch, "bf16", d, False, "forward").config.block_m > 0


def test_lookup_falls_back_to_similar_hardware():
    rows = [
        {"backend": "x", "arch": "sm_80", "dtype": "fp16", "head_dim": 64, "causal": False, "pass": "forward",
         "config": {"block_m": 64, "block_n": 32}, "provenance": {"kind": "unmeasured", "note": "test"}},
        {"backend": "x", "arch": "sm_90", "dtype": "bf16", "head_dim": [64, 128], "causal": [False, True],
         "pass": "forward", "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "pipelined": True},
         "provenance": {"kind": "measured", "note": "test", "gpu": "H100", "date": "2026-11-21", "versions": "t"}},
    ]  # fmt: skip
    table = heuristics.parse_table(rows)
    assert len(table) == 5
    original = heuristics.table
    heuristics.table = lambda: table
    try:
        assert heuristics.lookup("x", "sm_89", "bf16", 40, True, "forward").config.block_m == 64  # -> sm_80, fp16
        hopper = heuristics.lookup("x", "sm_90", "bf16", 100, True, "forward")
        assert hopper.config.option("pipelined") is True and hopper.key.head_dim == 128
        assert "measured on H100" in str(hopper.provenance)
        with pytest.raises(LookupError, match="no kernel configuration"):
            heuristics.lookup("x", "sm_90", "bf16", 256, False, "backward")
    finally:
        heuristics.table = original


def test_duplicate_rows_are_rejected():
    row = {"backend": "x", "arch": "sm_80", "dtype": "fp16", "head_dim": 64, "causal": False, "pass": "forward",
           "config": {"block_m": 64, "block_n": 32}, "provenance": {"kind": "unmeasured", "note": "t"}}  # fmt: skip
    with pytest.raises(ValueError, match="duplicate"):
        heuristics.parse_table([row, row])


def test_shared_memory_budget_and_the_seeds_rule():
    big = KernelConfig(block_m=256, block_n=256, num_stages=3)
    assert not smem.budget(big, "sm_80", 256, 2, "forward").fits  # 256x256 tiles, 3 stages: 896 KiB
    assert smem.budget(KernelConfig(128, 64, num_stages=2), "sm_90", 128, 2, "forward").fits
    # The seeds' B_c = M / 4d: 100 KiB of fp16 SRAM and d = 64 gives 200 columns.
    assert smem.seed_block_columns(100 * 1024, 64, 2) == 200
    assert smem.padded_head_dim(40) == 64 and smem.padded_head_dim(8) == 16


class FakeBackend(flash.Backend):
    name = "tunable"
    version = "1.0"

    def forward_reasons(self, spec):
        return []

    def forward(self, spec, args):
        raise NotImplementedError


def test_autotune_caches_the_fastest_fitting_candidate_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "arch_of", lambda device: "sm_80")  # as if on an A100: a smem budget applies
    autotune._loaded.clear()
    q = torch.randn(1, 100, 2, 64, dtype=torch.float16)
    spec = flash.build_spec(q, q, q, causal=True)
    candidates = [
        KernelConfig(64, 64),
        KernelConfig(32, 32),
        KernelConfig(512, 512, num_stages=4),
        KernelConfig(16, 16),
    ]
    speed = {64: 2.0, 32: 1.0, 16: None}
    ran: list[KernelConfig] = []

    def run(config):
        if speed[config.block_m] is None:
            raise RuntimeError("compiler said no")
        ran.append(config)

    def timer(fn):  # pretend each candidate takes speed[block_m] milliseconds
        fn()
        return speed[ran[-1].block_m]

    backend = FakeBackend()
    winner = autotune.tune(backend, spec, "forward", candidates, run, timer=timer)
    assert winner == KernelConfig(32, 32)
    data = json.loads((tmp_path / "autotune.json").read_text())
    ((key, row),) = data["winners"].items()
    assert "torch " + torch.__version__ in key and "tunable 1.0" in key and "fp16/d64/causal" in key
    assert any("does not fit" in str(v) for v in row["candidates"].values())
    assert any("compiler said no" in str(v) for v in row["candidates"].values())
    autotune._loaded.clear()  # a new process reads the file back
    assert heuristics.config_for(backend, spec, "forward") == KernelConfig(32, 32)
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    assert autotune.cached_winner(backend, spec, "forward") is None


def test_a_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    (tmp_path / "autotune.json").write_text("{not json")
    autotune._loaded.clear()
    q = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    assert autotune.cached_winner(FakeBackend(), flash.build_spec(q, q, q), "forward") is None


def test_autotune_mode_end_to_end(tmp_path, monkeypatch):
    """FLASH_AUTOTUNE=1: the first call of a problem class times the backend's candidates, the winner
    is cached as JSON and reused; results are the same whichever candidate wins."""
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune._loaded.clear()
    q, k, v = (torch.randn(1, 300, 2, 32, requires_grad=True) for _ in range(3))
    out = flash.attention(q, k, v, causal=True, backend="reference")
    out.sum().backward()
    winners = json.loads((tmp_path / "autotune.json").read_text())["winners"]
    assert {key.rsplit("/", 1)[-1] for key in winners} == {"forward", "backward"}
    for row in winners.values():
        assert len(row["candidates"]) == 4 and all(isinstance(ms, float) for ms in row["candidates"].values())
    torch.testing.assert_close(out, flash.attention(q, k, v, causal=True, backend="reference"))
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    torch.testing.assert_close(out, flash.attention(q, k, v, causal=True, backend="reference"))


def test_backward_budget_counts_a_separate_dq_kernel():
    main_only = KernelConfig(64, 64, num_stages=2)
    with_dq = KernelConfig(64, 64, num_stages=2, extra=(("dq_block_m", 256), ("dq_block_n", 128)))
    assert smem.shared_memory_bytes(with_dq, 128, 2, "backward") > smem.shared_memory_bytes(
        main_only, 128, 2, "backward"
    )
