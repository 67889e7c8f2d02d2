"""flash-triton's backend object: registration, lazy imports, support declarations, configurations, TMA planning.

None of these run a kernel; they are fast on any machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import flash
from flash import heuristics, support
from flash.backend import PLUGIN_API_VERSION
from flash.heuristics.smem import budget
from flash.spec import build_spec

pytest.importorskip("flash_triton")

from flash_triton import backend as triton_backend
from flash_triton import launch, runtime, tma
from flash_triton.backend import TritonBackend


def reasons(backend, pass_, spec):
    return support.reasons(backend, spec, pass_)


def _spec(dtype=torch.float16, shape=(2, 33, 4, 40), device="cpu", **options):
    q = torch.randn(shape).to(dtype)
    return build_spec(q.to(device), q.to(device), q.to(device), **options)


def test_entry_point_and_identity() -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="flash.backends")}
    assert eps["triton"] == "flash_triton.backend:TritonBackend"
    backend = TritonBackend()
    assert (backend.name, backend.priority, backend.plugin_api) == ("triton", 100, PLUGIN_API_VERSION)
    assert backend.version == metadata.version("flash-triton")


def test_loading_flash_and_the_backend_imports_no_triton() -> None:
    code = (
        "import sys, flash; from flash.registry import REGISTRY; REGISTRY.get('triton'); flash.backends(); "
        "assert 'triton' not in sys.modules, 'triton imported'; assert 'cupy' not in sys.modules; "
        "assert 'flash_triton.forward_kernel' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = TritonBackend()
    monkeypatch.setattr(runtime, "mode_mismatch", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reasons() == []
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backend.unavailable_reasons()
    if not torch.cuda.is_available():
        assert reasons and "TRITON_INTERPRET=1" in reasons[0]
    monkeypatch.setattr(runtime, "triton_installed", lambda: False)
    assert "triton is not installed" in backend.unavailable_reasons()[0]


def test_interpreter_mode_must_be_set_before_triton_is_imported() -> None:
    """Triton decorates its own library functions at import: flipping TRITON_INTERPRET later cannot work."""
    late = (
        "import os, triton, flash; os.environ['TRITON_INTERPRET'] = '1'; "
        "from flash_triton.backend import TritonBackend; print(TritonBackend().unavailable_reasons())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", late], check=True, capture_output=True, text=True, env=env).stdout
    assert "set after triton was imported" in out
    early = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'; import triton, flash; "
        "from flash_triton.backend import TritonBackend; print(TritonBackend().unavailable_reasons())"
    )
    out = subprocess.run([sys.executable, "-c", early], check=True, capture_output=True, text=True, env=env).stdout
    assert out.strip() == "[]"


def test_compiled_kernel_modules_are_looked_up_once() -> None:
    """Every launch asks runtime.kernels() for the modules; on a GPU (not interpreting) the second ask
    must not import anything again (nine imports cost more host time than a small launch)."""
    code = (
        "import importlib\n"
        "from flash_triton import runtime\n"
        "first = runtime.kernels()\n"
        "assert not any(m.INTERPRETED for m in first)\n"
        "def forbidden(*a, **k): raise AssertionError('imported again')\n"
        "importlib.import_module = forbidden\n"
        "assert runtime.kernels() is first\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_declares_what_it_does_not_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = TritonBackend()
    full = _spec(causal=True, window=(5, 0), softcap=3.0, dropout_p=0.1, dropout_seed=1, deterministic=True)
    assert reasons(backend, "forward", full) == [] and reasons(backend, "backward", full) == []
    assert reasons(backend, "forward", _spec(dtype=torch.bfloat16, shape=(1, 5, 6, 256))) == []
    fp32 = reasons(backend, "forward", _spec(dtype=torch.float32))
    assert any("float32" in r for r in fp32)
    fp8 = _spec(dtype=torch.float8_e4m3fn)
    assert reasons(backend, "forward", fp8) == []  # fp8 forwards run; fp8 attention has no backward
    assert reasons(backend, "forward", _spec(dtype=torch.float8_e4m3fn, out_dtype=torch.float16)) == []
    assert any("float8_e4m3fn" in r for r in reasons(backend, "backward", fp8))
    with monkeypatch.context() as ampere:
        ampere.setattr(triton_backend, "device_capability", lambda device: (8, 0))
        assert any("fp8 inputs need sm_89" in r for r in reasons(backend, "forward", fp8))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("tensors on cpu" in r for r in reasons(backend, "forward", _spec()))


def _kv_spec(cache_dtype=torch.bfloat16, dtype=torch.bfloat16, cache=None, **options):
    from flash.kvspec import build_kv_spec

    q = torch.randn(2, 1, 8, 64).to(dtype)
    cache = torch.randn(2, 100, 2, 64).to(cache_dtype) if cache is None else cache
    return build_kv_spec(q, cache, cache, cache_seqlens=5, **options)


def test_declares_its_kv_cache_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = TritonBackend()
    table = torch.zeros(2, 1, dtype=torch.int32)
    paged = _kv_spec(block_table=table, window=(10, 0), sink_tokens=2, sinks=torch.zeros(8), softcap=5.0)
    assert reasons(backend, "decode", paged) == []
    assert any("float32" in r for r in reasons(backend, "decode", _kv_spec(torch.float32, torch.float32)))
    fp8 = _kv_spec(torch.float8_e4m3fn, k_descale=torch.ones(()), v_descale=torch.ones(()))
    assert reasons(backend, "decode", fp8) == []
    monkeypatch.setattr("flash_triton.backend.device_capability", lambda device: (8, 0))
    assert any("sm_89" in r for r in reasons(backend, "decode", fp8))
    huge = dataclasses.replace(_kv_spec(), seqlen_q=600_000)  # 4 x 600k rows in blocks of 16: past the grid
    assert any("grid" in r for r in reasons(backend, "decode", huge))
    interleaved = torch.empty(100, 2, 2, 64, dtype=torch.bfloat16).transpose(0, 1)  # (slot, batch, ...) storage
    assert _kv_spec(cache=interleaved).token_stride == 256
    wide = dataclasses.replace(_kv_spec(), token_stride=2**23)  # a tile's int32 row offsets could overflow
    assert any("token stride" in r for r in reasons(backend, "decode", wide))


def test_explain_names_triton_on_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from flash.registry import REGISTRY

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runtime, "mode_mismatch", lambda: None)
    REGISTRY.refresh()
    try:
        q = torch.randn(1, 8, 2, 16, dtype=torch.float16)
        decision = flash.explain(q, q, q, causal=True)
        assert decision.forward.chosen == "triton" and decision.backward.chosen == "triton"
    finally:
        monkeypatch.delenv("TRITON_INTERPRET")
        REGISTRY.refresh()


# ----------------------------------------------------------------------------- configuration table


def _triton_entries():
    return list(heuristics.table_of(TritonBackend()).values())


def test_table_entries_fit_shared_memory_and_say_where_they_come_from() -> None:
    entries = _triton_entries()
    assert entries
    for entry in entries:
        arch = "sm_80" if entry.key.arch == "cpu" else entry.key.arch
        assert budget(entry.config, arch, entry.key.head_dim, 2, entry.key.pass_).fits, entry
        assert entry.provenance.kind in ("measured", "published", "unmeasured")
        if entry.provenance.kind == "measured":
            assert entry.provenance.gpu and entry.provenance.date and entry.provenance.versions


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "cpu"])
def test_table_covers_every_class(arch: str) -> None:
    for dtype in ("fp16", "bf16"):
        for head_dim in (16, 40, 64, 96, 128, 160, 256):
            for causal in (False, True):
                for pass_ in ("forward", "backward", "decode"):
                    entry = heuristics.lookup(TritonBackend(), arch, dtype, head_dim, causal, pass_)
                    assert entry.key.arch == arch


def test_backward_configs_name_both_kernels() -> None:
    for entry in _triton_entries():
        if entry.key.pass_ == "backward":
            dkdv, dq = launch.backward_tilings(entry.config)
            assert min(dkdv.block_m, dkdv.block_n, dq.block_m, dq.block_n) >= 16


def test_fallback_ladder_only_simplifies() -> None:
    first = launch.Tiling(128, 128, 8, 3, tma=True)
    steps = launch.ladder(first)
    assert steps[0] == first and len(set(steps)) == len(steps)
    assert steps[-1] == launch.Tiling(16, 16, 4, 2)
    for a, b in itertools.pairwise(steps):
        assert b.block_m <= a.block_m and b.block_n <= a.block_n and b.num_warps <= a.num_warps
        assert b.tma <= a.tma


@pytest.mark.parametrize(("head_dim", "padded"), [(1, 16), (16, 16), (40, 64), (64, 64), (96, 128), (160, 256)])
def test_padded_head_dim(head_dim: int, padded: int) -> None:
    assert launch.padded_head_dim(head_dim) == padded


# ----------------------------------------------------------------------------- TMA planning


def _canonical(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bshd" else t.transpose(1, 2)


def test_row_map_bshd_uses_head_columns() -> None:
    t = torch.empty(2, 100, 4, 64, dtype=torch.bfloat16)
    m = tma.row_map(t, 64, 64, batch=2, varlen=False)
    assert m == tma.RowMap(rb=100, rh=0, ch=64, rows=200, cols=256, row_stride=256)


def test_row_map_bhsd_uses_rows() -> None:
    t = _canonical(torch.empty(2, 4, 100, 128, dtype=torch.bfloat16), "bhsd")
    m = tma.row_map(t, 128, 128, batch=2, varlen=False)
    assert m == tma.RowMap(rb=400, rh=100, ch=0, rows=800, cols=128, row_stride=128)


def test_row_map_packed_qkv_and_varlen() -> None:
    qkv = torch.empty(2, 50, 3, 4, 64, dtype=torch.float16)
    q = qkv[:, :, 0]
    m = tma.row_map(q, 64, 64, batch=2, varlen=False)
    assert (m.rb, m.ch, m.row_stride, m.rows, m.cols) == (50, 64, 3 * 4 * 64, 100, 256)
    packed = torch.empty(77, 4, 64, dtype=torch.float16).unsqueeze(0)
    m = tma.row_map(packed, 64, 64, batch=3, varlen=True)
    assert (m.rb, m.rows) == (0, 77)


def test_row_map_refuses_what_tma_cannot_address() -> None:
    padded = torch.empty(2, 100, 4, 72, dtype=torch.bfloat16)[..., :64]  # head stride 72: not one tile wide
    assert tma.row_map(padded, 64, 64, batch=2, varlen=False) is None
    odd = torch.empty(2, 100, 4, 40, dtype=torch.bfloat16)  # tile (64) wider than a head (40), bshd
    assert tma.row_map(odd, 40, 64, batch=2, varlen=False) is None
    base = torch.empty(2 * 100 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 100, 4, 64)  # 2-byte offset
    assert tma.row_map(base, 64, 64, batch=2, varlen=False) is None


@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_tuning_candidates_vary_the_table_entry_and_fit_hopper(monkeypatch: pytest.MonkeyPatch, pass_: str) -> None:
    import dataclasses

    monkeypatch.setattr(heuristics, "arch_of", lambda device: "sm_90")
    spec = dataclasses.replace(_spec(dtype=torch.bfloat16, shape=(1, 64, 2, 128)), device=torch.device("cuda"))
    backend = TritonBackend()
    base = heuristics.config_for(backend, spec, pass_)
    candidates = backend.tuning_candidates(spec, pass_)
    assert len(candidates) == 16 and len(set(candidates)) == 16
    assert all(c.extra == base.extra for c in candidates)  # knobs such as the dQ tiles are kept
    assert any(budget(c, "sm_90", 128, 2, pass_).fits for c in candidates)
    assert backend.tuning_candidates(_spec(), pass_) == []  # the interpreter is not worth timing


def _compile_report(calls: str) -> list[dict]:
    """The rows of packages/flash-triton/scripts/compile_report.py after ``calls`` (its functions as
    ``c.``), run in a process of their own outside the interpreter."""
    import json

    scripts = os.path.join(os.path.dirname(__file__), "..", "..", "packages", "flash-triton", "scripts")
    code = f"import sys; sys.path.insert(0, sys.argv[1]); import compile_report as c; {calls}; "
    code += "import json; print(json.dumps(c.RESULTS))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, scripts], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and "FAILED" not in done.stdout, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_paged_tile_costs_about_what_a_contiguous_one_does_on_hopper() -> None:
    """The decoding kernel's unmasked tile loop built for sm_90 (PTX and SASS, per thread): with pages
    of a power of two keys, a paged tile keeps the contiguous cache's K/V copies and tiles in flight,
    reads its page numbers through asynchronous copies pipelined ahead of them, and does no integer
    division (the per-key path, which a page size that is not a power of two keeps, divides and
    costs much more). A contiguous tile, one base plus loop-invariant row offsets like a page
    holding the tile, costs at most what that paged tile does, with no per-key 64-bit multiply."""
    calls = (
        "c.run_decode(90, 'contiguous'); c.run_decode(90, 'paged 16', page_size=16); "
        "c.run_decode(90, 'paged 64', page_size=64); c.run_decode(90, 'paged 48', page_size=48)"
    )
    rows = {r["case"]: r for r in _compile_report(calls) if r["kernel"] == "kv_decode_kernel"}
    loop = {case: dict(r["loops"][1], sass=r["sass_loops"][1]) for case, r in rows.items()}  # the unmasked loop
    base = loop["contiguous"]
    ahead = base["wait_group"] // base["groups"]  # K/V tiles still in flight while one is used
    assert ahead >= 2, base
    for case, tile in loop.items():
        assert tile["copies_16B"] == base["copies_16B"], (case, tile)
        assert tile["wait_group"] // tile["groups"] == ahead, (case, tile)
        assert rows[case]["ldl_stl"] == 0 and rows[case]["stack"] == 0, rows[case]
    for case in ("paged 16", "paged 64"):
        tile = loop[case]
        assert tile["div_rem"] == 0 and tile["ld_global"] == 0 and 1 <= tile["copies_4B"] <= 8, (case, tile)
        assert tile["sass"] <= 1.4 * base["sass"], (case, tile, base)
    assert loop["paged 64"]["copies_4B"] == 1  # one table entry per tile
    assert base["sass"] <= loop["paged 64"]["sass"] and base["mul64"] <= 2, (base, loop["paged 64"])
    assert loop["paged 48"]["div_rem"] > 0 and loop["paged 48"]["sass"] > 1.5 * base["sass"], loop["paged 48"]


def test_kv_cache_kernels_compile_for_hopper_without_spills() -> None:
    """The KV-cache kernels built for sm_90 by Triton's own compiler (no GPU needed) with the table's
    configurations: every variant compiles, and none spills registers."""
    rows = _compile_report(
        "c.run_decode(90, 'contiguous'); c.run_decode(90, 'paged', page_size=16); "
        "c.run_decode(90, 'tokens', seqlen_q=8, causal=True, softcap=30.0); "
        "c.run_decode(90, 'fp8', cache_dtype=__import__('torch').float8_e4m3fn)"
    )
    kernels = {(r["kernel"], r["case"]) for r in rows}
    assert len(kernels) == 12  # append, decode, combine for each of the four
    assert all(r["ldl_stl"] == 0 and r["stack"] == 0 for r in rows), [r for r in rows if r["ldl_stl"]]
