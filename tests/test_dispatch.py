"""Registry and dispatch: discovery, priorities, forcing, explanations, errors, backward fallback."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from typing import ClassVar

import pytest
import torch

import flash
from flash import NoBackendError
from flash.backend import Backend, Support
from flash.reference import tiled
from flash.registry import REGISTRY


class FastHalf(Backend):
    """Pretends to be a fast kernel: fp16 only, no causal, no backward. Computes with the reference code."""

    name = "fasthalf"
    version = "9.9"
    priority = 10_000  # above every real backend, so the tests do not depend on what else is installed
    runs: ClassVar[list[str]] = []

    forward_support = Support(
        dtypes=frozenset({torch.float16}), features=frozenset({"gqa"}), devices=frozenset({"cpu"})
    )

    def forward(self, spec, args, config):
        FastHalf.runs.append("forward")
        tiled.forward(spec, args, 16, 16)


class OldApi(FastHalf):
    name = "oldapi"
    plugin_api = 0


class Unavailable(FastHalf):
    name = "unavailable"
    priority = 20_000

    def unavailable_reasons(self):
        return ["needs a quantum accelerator"]


@pytest.fixture
def fasthalf():
    FastHalf.runs = []
    REGISTRY.register(FastHalf())
    yield
    REGISTRY.unregister("fasthalf")


def half(causal=False, dtype=torch.float16):
    q = torch.randn(1, 9, 2, 8, dtype=dtype)
    return q, torch.randn_like(q), torch.randn_like(q)


def test_highest_priority_supporting_backend_wins(fasthalf):
    flash.attention(*half())
    assert FastHalf.runs == ["forward"]
    flash.attention(*half(), causal=True)  # fasthalf declines causal: reference runs
    flash.attention(*half(dtype=torch.float32))
    assert FastHalf.runs == ["forward"]


def test_priority_override(fasthalf):
    flash.set_backend_priority("fasthalf", -1)
    try:
        flash.attention(*half())
        assert FastHalf.runs == []
    finally:
        flash.set_backend_priority("fasthalf", None)
    flash.attention(*half())
    assert FastHalf.runs == ["forward"]


def test_forcing_precedence(fasthalf, monkeypatch):
    flash.set_backend_priority("fasthalf", -1)
    try:
        flash.attention(*half(), backend="fasthalf")
        with flash.use_backend("fasthalf"):
            flash.attention(*half())
        monkeypatch.setenv("FLASH_BACKEND", "fasthalf")
        flash.attention(*half())
        with flash.use_backend("reference"):  # the context manager beats the environment
            flash.attention(*half())
        assert FastHalf.runs == ["forward"] * 3
    finally:
        flash.set_backend_priority("fasthalf", None)


def test_forced_backend_that_cannot_run_is_an_error(fasthalf):
    with pytest.raises(NoBackendError) as info:
        flash.attention(*half(), causal=True, backend="fasthalf")
    text = str(info.value)
    assert "forced by backend= argument" in text and "causal not supported" in text


def test_unknown_backend_is_named():
    with pytest.raises(NoBackendError, match="no backend named 'nosuch'"):
        flash.attention(*half(), backend="nosuch")


def test_no_backend_error_lists_every_backend_with_reasons(fasthalf, monkeypatch):
    monkeypatch.setattr(REGISTRY, "unavailable_reasons", lambda name: ["switched off for this test"])
    with pytest.raises(NoBackendError) as info:
        flash.attention(*half())
    text = str(info.value)
    for name in REGISTRY.names():
        assert name in text
    assert "switched off for this test" in text


def test_backward_falls_back_through_the_lse_contract(fasthalf):
    q, k, v = (t.requires_grad_() for t in half())
    out = flash.attention(q, k, v, backend="fasthalf")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert FastHalf.runs == ["forward"]
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(flash.attention(q2, k2, v2), (q2, k2, v2), torch.ones_like(q2))
    for got, want in zip(grads, exact):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_explain_shows_the_decision_and_every_rejection(fasthalf):
    q, k, v = half()
    explanation = flash.explain(q, k, v, causal=True)
    assert explanation.forward.chosen not in (None, "fasthalf")
    assert explanation.backward.chosen not in (None, "fasthalf")
    text = str(explanation)
    assert f"forward: {explanation.forward.chosen}" in text
    assert "fasthalf" in text and "causal not supported" in text and "no backward pass" in text
    assert flash.explain(q, k, v).forward.chosen == "fasthalf"


def test_unavailable_backend_is_skipped_with_its_reason():
    REGISTRY.register(Unavailable())
    try:
        text = str(flash.explain(*half()))
        assert "needs a quantum accelerator" in text
        info = {b.name: b for b in flash.backends()}["unavailable"]
        assert not info.usable and info.reasons == ("needs a quantum accelerator",)
    finally:
        REGISTRY.unregister("unavailable")


def test_registering_an_incompatible_backend_fails():
    with pytest.raises(flash.BackendError, match="plugin API 0"):
        REGISTRY.register(OldApi())


def test_entry_points_that_fail_are_reported_not_fatal(monkeypatch):
    """A plugin that fails to import, or speaks another plugin API, is listed with the reason."""
    fake = {
        "broken": metadata.EntryPoint("broken", "flash_no_such_module:Backend", "flash.backends"),
        "oldapi": metadata.EntryPoint("oldapi", "tests.test_dispatch:OldApi", "flash.backends"),
        "misnamed": metadata.EntryPoint("misnamed", "tests.test_dispatch:FastHalf", "flash.backends"),
    }
    REGISTRY.refresh()
    monkeypatch.setattr(REGISTRY, "_entry_points", {**REGISTRY._discovered(), **fake})
    try:
        infos = {b.name: b for b in flash.backends()}
        assert "ModuleNotFoundError" in infos["broken"].reasons[0]
        assert (
            "plugin API 0" in infos["oldapi"].reasons[0]
            and f"speaks API {flash.PLUGIN_API_VERSION}" in infos["oldapi"].reasons[0]
        )
        assert "registered as 'misnamed'" in infos["misnamed"].reasons[0]
        assert infos["reference"].usable
        assert flash.attention(*half()).shape == (1, 9, 2, 8)  # dispatch still works
        assert "ModuleNotFoundError" in str(flash.explain(*half()))
    finally:
        REGISTRY.refresh()


def test_backends_lists_version_package_and_status():
    info = {b.name: b for b in flash.backends()}["reference"]
    assert info.usable and info.distribution == "flash-core" and info.version == flash.__version__
    assert "reference" in str(info)


def test_import_flash_loads_no_backend_and_no_gpu_library():
    code = (
        "import sys, flash\n"
        "heavy = [m for m in ('triton', 'cupy', 'flash_triton', 'flash_cuda', 'flash.reference.backend') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


class Slow(FastHalf):
    """A second fp16 backend with a higher priority than FastHalf: the measurement says it is slower."""

    name = "slowhalf"
    priority = 20_000


def test_the_measured_ranking_orders_auto_and_a_user_priority_overrides_it(fasthalf, monkeypatch):
    from flash import plan
    from flash.heuristics import Provenance, ranking

    REGISTRY.register(Slow())
    measured = ranking.Ranking(("fasthalf", "slowhalf"), Provenance("measured", "test", "GPU", "today", "v"))
    monkeypatch.setattr(ranking, "ranking_for", lambda spec, pass_: measured if spec.dtype == torch.float16 else None)
    monkeypatch.setattr(flash.dispatch, "ranking_for", ranking.ranking_for)
    try:
        q, k, v = half()
        decision = flash.explain(q, k, v).forward
        assert decision.chosen == "fasthalf" and "fastest first, measured on GPU" in str(decision)
        flash.set_backend_priority("slowhalf", 30_000)  # the user's word beats the measurement
        plan.forget()
        assert flash.explain(q, k, v).forward.chosen == "slowhalf"
    finally:
        flash.set_backend_priority("slowhalf", None)
        REGISTRY.unregister("slowhalf")
