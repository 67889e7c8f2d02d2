"""The per-GPU configuration table, its shared-memory check, and autotuning's JSON cache."""

from __future__ import annotations

import json

import pytest
import torch

import flash
from flash import heuristics
from flash.backend import Support
from flash.heuristics import KernelConfig, autotune, smem
from flash.registry import REGISTRY

ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1, "fp32": 4, "fp64": 8}


ENTRIES = [entry for table in heuristics.installed_tables().values() for entry in table.values()]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: "/".join(map(str, e.key.__dict__.values())))
def test_every_entry_fits_its_gpu_and_says_where_it_came_from(entry):
    key, provenance = entry.key, entry.provenance
    assert provenance.kind in ("measured", "published", "unmeasured") and provenance.note
    if provenance.kind == "measured":
        assert provenance.gpu and provenance.date and provenance.versions, entry
    problem = smem.problem(
        REGISTRY.get(key.backend), entry.config, key.arch, key.head_dim, ELEMENT_BYTES[key.dtype], key.pass_
    )
    assert not problem, f"{key}: {problem}"


def test_every_installed_kernel_backend_has_configs_for_hopper_and_ampere():
    for name in REGISTRY.names():
        if name == "reference":
            continue
        for arch in ("sm_80", "sm_90"):
            for d in (64, 128):
                assert heuristics.lookup(REGISTRY.get(name), arch, "bf16", d, False, "forward").config.block_m > 0


class TableBackend(flash.Backend):
    """A backend whose table is the rows it is given."""

    name = "x"
    forward_support = Support(dtypes=frozenset({torch.float16}), features=frozenset())

    def __init__(self, rows):
        self.rows = rows

    def heuristics_rows(self):
        return self.rows

    def forward(self, spec, args, config):
        raise NotImplementedError


def test_lookup_falls_back_to_similar_hardware():
    rows = [
        {"arch": "sm_80", "dtype": "fp16", "head_dim": 64, "causal": False, "pass": "forward",
         "config": {"block_m": 64, "block_n": 32}, "provenance": {"kind": "unmeasured", "note": "test"}},
        {"backend": "x", "arch": "sm_90", "dtype": "bf16", "head_dim": [64, 128], "causal": [False, True],
         "pass": "forward", "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "knob": True},
         "provenance": {"kind": "measured", "note": "test", "gpu": "H100", "date": "2026-11-21", "versions": "t"}},
    ]  # fmt: skip
    backend = TableBackend(rows)
    assert len(heuristics.table_of(backend)) == 5
    assert heuristics.lookup(backend, "sm_89", "bf16", 40, True, "forward").config.block_m == 64  # -> sm_80, fp16
    hopper = heuristics.lookup(backend, "sm_90", "bf16", 100, True, "forward")
    assert hopper.config.option("knob") is True and hopper.key.head_dim == 128
    assert "measured on H100" in str(hopper.provenance)
    with pytest.raises(LookupError, match="no kernel configuration"):
        heuristics.lookup(backend, "sm_90", "bf16", 256, False, "backward")


def test_a_table_row_that_cannot_fit_or_names_another_backend_is_rejected():
    row = {"arch": "sm_86", "dtype": "fp16", "head_dim": 256, "causal": False, "pass": "forward",
           "config": {"block_m": 256, "block_n": 256, "num_stages": 3},
           "provenance": {"kind": "unmeasured", "note": "t"}}  # fmt: skip
    with pytest.raises(ValueError, match="shared memory"):
        heuristics.table_of(TableBackend([row]))
    with pytest.raises(ValueError, match="names backend 'y'"):
        heuristics.table_of(TableBackend([{**row, "backend": "y"}]))


@pytest.mark.parametrize(
    "config",
    [{"block_m": 0, "block_n": 64}, {"block_m": -64, "block_n": 64}, {"block_m": "64", "block_n": 64},
     {"block_m": True, "block_n": 64}, {"block_n": 64}, [64, 64], "64x64", {"block_m": 64, "block_n": 64, "k": [1]}],
)  # fmt: skip
def test_configurations_are_validated(config):
    with pytest.raises(ValueError, match="kernel configuration"):
        KernelConfig.from_json(config)


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


class FakeBackend(flash.Backend):
    name = "tunable"
    version = "1.0"

    forward_support = Support(dtypes=frozenset({torch.float16}), features=frozenset())

    def forward(self, spec, args, config):
        raise NotImplementedError


def test_autotune_caches_the_fastest_fitting_candidate_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "arch_of", lambda device: "sm_80")  # as if on an A100: a smem budget applies
    autotune.forget()
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
    autotune.forget()  # a new process reads the file back
    assert heuristics.config_for(backend, spec, "forward") == KernelConfig(32, 32)
    monkeypatch.setenv("FLASH_AUTOTUNE", "0")
    assert autotune.cached_winner(backend, spec, "forward") is None


def test_a_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    (tmp_path / "autotune.json").write_text("{not json")
    autotune.forget()
    q = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    assert autotune.cached_winner(FakeBackend(), flash.build_spec(q, q, q), "forward") is None


def test_autotune_mode_end_to_end(tmp_path, monkeypatch):
    """FLASH_AUTOTUNE=1: the first call of a problem class times the backend's candidates, the winner
    is cached as JSON and reused; results are the same whichever candidate wins."""
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune.forget()
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


def _spec16():
    q = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    return flash.build_spec(q, q, q)


def _cache_with(tmp_path, monkeypatch, winner):
    """A cache file whose only winner, under the key FakeBackend would look up, is ``winner``."""
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune.forget()
    key = autotune._key(FakeBackend(), _spec16(), "forward")
    (tmp_path / "autotune.json").write_text(json.dumps({"format": autotune.CACHE_FORMAT, "winners": {key: winner}}))


@pytest.mark.parametrize(
    "winner",
    [{"config": {"block_m": 0, "block_n": 64}}, {"config": {"block_m": -128, "block_n": 64}},
     {"config": {"block_m": "64", "block_n": 64}}, {"config": [64, 64]}, "64x64", [1, 2], {"no": "config"},
     {"config": {"block_m": 4096, "block_n": 4096, "num_stages": 16}}],
)  # fmt: skip
def test_a_bad_cached_winner_is_ignored_with_a_warning(tmp_path, monkeypatch, winner):
    monkeypatch.setattr(autotune, "arch_of", lambda device: "sm_90")  # the last one cannot fit a GPU
    _cache_with(tmp_path, monkeypatch, winner)
    with pytest.warns(RuntimeWarning, match="ignoring a bad cached winner"):
        assert autotune.cached_winner(FakeBackend(), _spec16(), "forward") is None


@pytest.mark.parametrize("content", ["[]", '{"format": 2}', '{"format": 2, "winners": []}', "null", '"text"'])
def test_a_cache_of_the_wrong_shape_is_ignored(tmp_path, monkeypatch, content):
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune.forget()
    (tmp_path / "autotune.json").write_text(content)
    assert autotune.cached_winner(FakeBackend(), _spec16(), "forward") is None
    q = torch.randn(1, 40, 2, 16)
    out = flash.attention(q, q, q, backend="reference")  # and attention still runs (and tunes)
    assert torch.isfinite(out).all()


def test_an_unwritable_cache_never_fails_the_call(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FLASH_CACHE_DIR", str(blocker))
    monkeypatch.setenv("FLASH_AUTOTUNE", "1")
    autotune.forget()
    q = torch.randn(1, 40, 2, 16)
    with pytest.warns(RuntimeWarning, match="cannot write the cache"):
        out = flash.attention(q, q, q, causal=True, backend="reference")
    torch.testing.assert_close(out, flash.attention(q, q, q, causal=True, backend="reference"))


_TUNE_IN_A_PROCESS = """
import sys, torch, flash
from flash.heuristics import KernelConfig, autotune
from tests.test_heuristics import FakeBackend
lengths = [int(x) for x in sys.argv[1:]]
for n in lengths:
    q = torch.randn(1, n, 1, 16, dtype=torch.float16)
    spec = flash.build_spec(q, q, q)
    autotune.tune(FakeBackend(), spec, "forward", [KernelConfig(16, 16)], lambda c: None, timer=lambda fn: 1.0)
"""


def test_concurrent_tuners_keep_each_others_winners(tmp_path, monkeypatch):
    import subprocess
    import sys

    env = {**__import__("os").environ, "FLASH_CACHE_DIR": str(tmp_path), "FLASH_AUTOTUNE": "1"}
    runs = [["3", "9", "33", "129"], ["5", "17", "65", "257"]]  # distinct length buckets: 8 classes
    procs = [subprocess.Popen([sys.executable, "-c", _TUNE_IN_A_PROCESS, *r], env=env) for r in runs]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    winners = json.loads((tmp_path / "autotune.json").read_text())["winners"]
    assert len(winners) == 8, sorted(winners)


def test_the_key_names_the_kernel_toolchain():
    class Toolchained(FakeBackend):
        def runtime_versions(self):
            return "compiler 9.9; driver 1234"

    assert "compiler 9.9; driver 1234" in autotune._key(Toolchained(), _spec16(), "forward")
