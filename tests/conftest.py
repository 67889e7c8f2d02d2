"""Shared pytest setup: which backends the conformance suite runs, the GPU marker, fresh seeds."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from flash.registry import REGISTRY

_SEED = int(os.environ.get("FLASH_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=None,
        help="run the conformance suite on this backend (repeatable); default: every installed backend",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the GPU tier); skipped without one")
    config.addinivalue_line("markers", "xdist_group(name): keep these tests in one worker under pytest-xdist")
    config.addinivalue_line("markers", "long: tens of seconds on its own: collected first, so it is not the tail")
    # torch.nn.MultiheadAttention's own internals warn about torch.jit; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"flash test seed: {_SEED} (set FLASH_TEST_SEED to reproduce)"]
    for name in REGISTRY.names():
        reasons = REGISTRY.unavailable_reasons(name)
        lines.append(f"backend {name}: " + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Parallel workers take tests in collection order: a long test collected last would be the tail.
    items.sort(key=lambda item: "long" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU tier: no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def selected_backends(config: pytest.Config) -> list[str]:
    return config.getoption("--backend") or REGISTRY.names()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config))


def seed_for(nodeid: str) -> int:
    """The seed of the test ``nodeid``: the session seed plus a stable hash of the name (Python salts
    ``hash()`` of strings per process, which would make FLASH_TEST_SEED useless)."""
    return (_SEED + zlib.crc32(nodeid.encode())) % 2**31


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test, derived from the session seed and the test's name."""
    return seed_for(request.node.nodeid)


def require_usable(backend: str) -> None:
    reasons = REGISTRY.unavailable_reasons(backend)
    if reasons:
        pytest.skip(f"backend {backend} unusable here: {'; '.join(reasons)}")
