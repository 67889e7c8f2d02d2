"""Regression tests for the defects a review and an adversarial input catalogue found in core.

Each test failed before the fix it guards (strided offsets read as contiguous, caches that grew
without end, plugins that could take flash down, NaN leaking from hidden keys, raw errors).
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from typing import ClassVar

import pytest
import torch

import flash
from flash import InvalidInputError, dispatch, plan
from flash.backend import FEATURES, Backend, Support
from flash.reference.oracle import dense_attention
from flash.registry import REGISTRY
from flash.spec import SUPPORTED_DTYPES
from flash.testing import assert_within_rule
from tests.conftest import require_usable

# ----------------------------------------------------------------------------- 1. strided offsets


def test_strided_cu_seqlens_mean_what_they_say(backend: str, seed: int) -> None:
    """A strided int32 offsets view gives the same answer as its contiguous copy, on every backend."""
    require_usable(backend)
    gen = torch.Generator().manual_seed(seed)
    strided = torch.tensor([0, 99, 4, 99, 10, 99], dtype=torch.int32)[::2]
    assert not strided.is_contiguous()
    q, k, v = (torch.randn(10, 2, 16, generator=gen).to(torch.float16) for _ in range(3))
    options = dict(max_seqlen_q=6, max_seqlen_k=6, backend=backend)
    reasons = flash.explain(q, k, v, cu_seqlens_q=strided, cu_seqlens_k=strided, backend=backend).forward
    if reasons.chosen != backend:
        pytest.skip(f"{backend} declares it cannot run this: {reasons}")
    got = flash.attention(q, k, v, cu_seqlens_q=strided, cu_seqlens_k=strided, **options)
    want = flash.attention(q, k, v, cu_seqlens_q=strided.contiguous(), cu_seqlens_k=strided.contiguous(), **options)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- 2. bounded caches


class Quick(Backend):
    """Runs anything on the CPU instantly (writes zeros): dispatch and planning are what is timed here."""

    name = "quick"
    priority = 50_000
    forward_support = Support(dtypes=frozenset(SUPPORTED_DTYPES), features=FEATURES, devices=frozenset({"cpu"}))

    def forward(self, spec, args, config):
        args.out.zero_()
        args.lse.zero_()


@pytest.fixture
def quick():
    REGISTRY.register(Quick())
    yield
    REGISTRY.unregister("quick")


def test_ten_thousand_calls_with_fresh_seeds_and_lengths_leave_the_caches_bounded(quick) -> None:
    q = torch.randn(1, 1, 1, 8)
    for i in range(10_000):
        k = torch.randn(1, 1 + i % 3000, 1, 8)
        flash.attention(q, k, k, dropout_p=0.1, dropout_seed=i)
    assert len(plan._plans) <= plan._plans.maxsize
    assert len(dispatch._decisions) <= dispatch._decisions.maxsize
    # fresh seeds alone add nothing
    before = len(dispatch._decisions), len(plan._plans)
    for i in range(100):
        flash.attention(q, q, q, dropout_p=0.1, dropout_seed=10_000 + i)
    assert (len(dispatch._decisions), len(plan._plans)) <= (before[0] + 1, before[1] + 1)


def test_a_plan_is_reused_and_the_seed_is_per_call(quick) -> None:
    q = torch.randn(2, 5, 2, 8)
    first, spec1 = plan.plan_for(q, q, q, None, None, None, None, None, None, None, "bshd", False, None, 0.0, None,
                                 0.5, 1, False, "auto", None)  # fmt: skip
    again, spec2 = plan.plan_for(q, q, q, None, None, None, None, None, None, None, "bshd", False, None, 0.0, None,
                                 0.5, 2, False, "auto", None)  # fmt: skip
    assert first is again and (spec1.dropout_seed, spec2.dropout_seed) == (1, 2)


def test_python_types_are_part_of_the_signature(quick) -> None:
    q = torch.randn(1, 4, 1, 8)
    flash.attention(q, q, q, causal=True)
    with pytest.raises(InvalidInputError, match="causal"):
        flash.attention(q, q, q, causal=1)  # 1 == True in Python: the cached plan must not let it through


# ----------------------------------------------------------------------------- 4. plugins


class BadPriority(Quick):
    name = "badpriority"
    priority = "high"  # type: ignore[assignment]


class RaisingPriority(Quick):
    name = "raisingpriority"

    @property
    def priority(self):  # type: ignore[override]
        raise RuntimeError("no priority today")


class Exiting(Quick):
    name = "exiting"

    def unavailable_reasons(self):
        sys.exit(3)


def _fake_entry_points(monkeypatch, points: dict[str, metadata.EntryPoint]) -> None:
    REGISTRY.refresh()
    monkeypatch.setattr(REGISTRY, "_entry_points", {**REGISTRY._discovered(), **points})


def test_a_plugin_with_a_bad_priority_is_unusable_and_the_rest_works(monkeypatch) -> None:
    points = {
        name: metadata.EntryPoint(name, f"tests.test_hardening:{cls}", "flash.backends")
        for name, cls in (("badpriority", "BadPriority"), ("raisingpriority", "RaisingPriority"))
    }
    _fake_entry_points(monkeypatch, points)
    try:
        infos = {b.name: b for b in flash.backends()}
        assert "not an int" in infos["badpriority"].reasons[0]
        assert "no priority today" in infos["raisingpriority"].reasons[0]
        q = torch.randn(1, 4, 1, 8)
        assert flash.attention(q, q, q).shape == q.shape
        assert flash.attention(q, q, q, backend="reference").shape == q.shape
    finally:
        REGISTRY.refresh()


_EXITING_PLUGIN = """
import importlib.abc, importlib.machinery, sys
from importlib import metadata
import torch, flash
from flash.registry import REGISTRY

class ExitOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "exit_on_import" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        sys.exit(7)

sys.meta_path.insert(0, ExitOnImport())
REGISTRY._discovered()["exiter"] = metadata.EntryPoint("exiter", "exit_on_import:Backend", "flash.backends")
print("REASON", {b.name: b for b in flash.backends()}["exiter"].reasons[0])
q = torch.randn(1, 4, 1, 8)
print("SHAPE", tuple(flash.attention(q, q, q).shape))
"""


def test_a_plugin_calling_sys_exit_at_import_does_not_end_the_process() -> None:
    result = subprocess.run([sys.executable, "-c", _EXITING_PLUGIN], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "SystemExit" in result.stdout and "SHAPE (1, 4, 1, 8)" in result.stdout


def test_an_exiting_availability_check_is_contained() -> None:
    REGISTRY.register(Exiting())
    try:
        info = {b.name: b for b in flash.backends()}["exiting"]
        assert not info.usable and "SystemExit" in info.reasons[0]
    finally:
        REGISTRY.unregister("exiting")


class Bomb(Quick):
    """Importing this plugin is recorded: a forced backend must never load it."""

    name = "bomb"
    loaded: ClassVar[int] = 0

    def __init__(self) -> None:
        Bomb.loaded += 1


def test_a_forced_backend_loads_no_other_plugin(monkeypatch) -> None:
    _fake_entry_points(
        monkeypatch, {"bomb": metadata.EntryPoint("bomb", "tests.test_hardening:Bomb", "flash.backends")}
    )
    Bomb.loaded = 0
    try:
        q = torch.randn(1, 4, 1, 8)
        flash.attention(q, q, q, backend="reference")
        with flash.use_backend("reference"):
            flash.attention(q, q, q, causal=True)
        assert Bomb.loaded == 0
    finally:
        REGISTRY.refresh()


class _Dist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "6.6.6"


def test_a_second_distribution_cannot_take_a_first_party_name(monkeypatch) -> None:
    from flash import registry

    impostor = metadata.EntryPoint("reference", "tests.test_hardening:Quick", "flash.backends")
    real = metadata.EntryPoint("reference", "flash.reference.backend:ReferenceBackend", "flash.backends")
    # EntryPoint is immutable; attach distributions the way importlib does, impostor first.
    object.__setattr__(impostor, "dist", _Dist("evil-attention"))
    object.__setattr__(real, "dist", _Dist("flash-core"))
    chosen, shadowed = registry._choose([impostor, real])  # type: ignore[arg-type]
    assert chosen["reference"] is real and shadowed == [impostor]
    monkeypatch.setattr(REGISTRY, "_entry_points", {**REGISTRY._discovered(), "reference": real})
    monkeypatch.setattr(REGISTRY, "_shadowed", [impostor])
    listed = [b for b in flash.backends() if b.distribution == "evil-attention"]
    assert len(listed) == 1 and not listed[0].usable and "belongs to flash-core" in listed[0].reasons[0]


def test_register_backend_rejects_what_is_not_a_backend() -> None:
    with pytest.raises(flash.BackendError, match="name"):
        flash.register_backend(object())  # type: ignore[arg-type]


def test_set_backend_priority_wants_an_int() -> None:
    with pytest.raises(InvalidInputError, match="priority"):
        flash.set_backend_priority("reference", "high")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- 5. numeric edges


@pytest.mark.parametrize(
    ("options", "argument"),
    [({"scale": 1e300}, "scale"), ({"scale": 1e-300}, "scale"), ({"softcap": 1e-300}, "softcap"),
     ({"softcap": 1e300}, "softcap"), ({"softcap": 1e-37, "scale": 1.0}, "softcap")],
)  # fmt: skip
def test_factors_float32_cannot_hold_are_refused(options, argument) -> None:
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(InvalidInputError) as info:
        flash.attention(q, q, q, **options)
    assert info.value.argument == argument


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mask", ["causal", "window"])
def test_hidden_values_contribute_nothing(backend: str, seed: int, bad: float, mask: str) -> None:
    """A non-finite value in a key/value row a query does not see leaves that query's output alone."""
    require_usable(backend)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if backend == "reference" else torch.float16
    q, k, v = (torch.randn(1, 37, 2, 16, generator=gen).to(dtype) for _ in range(3))
    options = {"causal": True} if mask == "causal" else {"window": (4, 3)}
    if flash.explain(q, k, v, backend=backend, **options).forward.chosen != backend:
        pytest.skip(f"{backend} does not run {mask}")
    poisoned = 29
    k2, v2 = k.clone(), v.clone()
    v2[:, poisoned, :, 5] = bad
    k2[:, poisoned, 1, 2] = bad
    out = flash.attention(q, k2, v2, backend=backend, **options)
    spec = flash.build_spec(q, k2, v2, **options)
    oracle, _ = dense_attention(spec, q, k2, v2)
    naive, _ = dense_attention(spec, q, k2, v2, compute_dtype=dtype)
    sees = torch.zeros(37, dtype=torch.bool)
    for i in range(37):
        sees[i] = (poisoned <= i) if mask == "causal" else (i - 4 <= poisoned <= i + 3)
    assert torch.isfinite(out[:, ~sees]).all(), "a row that never sees the bad key was poisoned"
    assert_within_rule(f"{backend} rows that do not see it", out[:, ~sees], oracle[:, ~sees], naive[:, ~sees], dtype)
    assert not torch.isfinite(out[:, sees]).all(dim=-1).any(), "a row that sees the bad key must not hide it"


# ----------------------------------------------------------------------------- 6. flash's errors, not raw ones


def _qkv():
    return (torch.randn(1, 4, 2, 8) for _ in range(3))


@pytest.mark.parametrize(
    ("options", "argument"),
    [({"window": (2**63, 0)}, "window"), ({"window": (0, 2**40)}, "window"),
     ({"dropout_p": 0.1, "dropout_seed": 2**63}, "dropout_seed"),
     ({"dropout_p": 0.1, "dropout_seed": 2**64}, "dropout_seed"),
     ({"causal": 1}, "causal"), ({"scale": True}, "scale"), ({"return_lse": "yes"}, "return_lse"),
     ({"check_values": "yes"}, "check_values"), ({"backend": 3}, "backend")],
)  # fmt: skip
def test_out_of_range_options_are_named(options, argument) -> None:
    with pytest.raises(InvalidInputError) as info:
        flash.attention(*_qkv(), **options)
    assert info.value.argument == argument


def test_max_seqlen_k_without_offsets_is_named() -> None:
    with pytest.raises(InvalidInputError) as info:
        flash.attention(*_qkv(), max_seqlen_k=4)
    assert info.value.argument == "max_seqlen_k"


@pytest.mark.parametrize(
    "cu",
    [torch.tensor([0.0, 2.0, 4.0]), torch.tensor([False, True, True]), torch.tensor([0.0, float("nan"), 4.0]), 1.5],
)
def test_offsets_of_the_wrong_kind_are_named(cu) -> None:
    q = torch.randn(4, 2, 8)
    with pytest.raises(InvalidInputError) as info:
        flash.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert info.value.argument == "cu_seqlens_q"


@pytest.mark.parametrize("query", [torch.randn(8), torch.randn(4, 8), [[1.0, 2.0]]])
def test_sdpa_drop_in_names_a_query_it_cannot_take(query) -> None:
    key = torch.randn(1, 2, 4, 8)
    with pytest.raises(InvalidInputError) as info:
        flash.scaled_dot_product_attention(query, key, key)  # type: ignore[arg-type]
    assert info.value.argument == "query"


def test_zero_query_heads_is_named() -> None:
    q = torch.randn(1, 4, 0, 8)
    k = torch.randn(1, 4, 1, 8)
    with pytest.raises(InvalidInputError) as info:
        flash.attention(q, k, k, backend="reference")
    assert info.value.argument == "q"


def test_fp8_that_requires_grad_is_refused_before_the_forward() -> None:
    q = torch.randn(1, 4, 2, 16).to(torch.float8_e4m3fn).requires_grad_()
    k = torch.randn(1, 4, 2, 16).to(torch.float8_e4m3fn)
    with pytest.raises(InvalidInputError, match="fp8") as info:
        flash.attention(q, k, k, backend="reference")
    assert info.value.argument == "q"


# ----------------------------------------------------------------------------- 7. reproducible seeds


def test_the_test_seed_is_the_same_in_every_process() -> None:
    """FLASH_TEST_SEED reproduces a run: the per-test seed must not depend on the process's hash salt."""
    code = "from tests.conftest import seed_for; print(seed_for('tests/test_x.py::test_y[case]'))"
    seeds = set()
    for salt in ("1", "2"):
        env = {**__import__("os").environ, "FLASH_TEST_SEED": "5", "PYTHONHASHSEED": salt}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        seeds.add(result.stdout.strip())
    assert len(seeds) == 1, seeds
