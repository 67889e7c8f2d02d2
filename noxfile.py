"""Sessions: ``nox`` runs lint, tests and docs (what CI runs); ``nox -s demo`` runs the main job,
``nox -s bench`` the benchmarks (flash-bench).

Every session installs torch first: ``FLASH_TORCH`` (default ``torch==2.13.0``) is the
requirement pip gets, so a CPU-only machine can point it at a CPU build.
Without a GPU, the Triton backend runs under Triton's interpreter (``TRITON_INTERPRET=1``)
and the CUDA backend is exercised by compiling every kernel variant with NVRTC.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

nox.options.sessions = ["lint", "tests", "docs"]
nox.options.reuse_venv = "yes"

TORCH = os.environ.get("FLASH_TORCH", "torch==2.13.0")
CORE = "packages/flash-core"
BACKEND_PACKAGES = {"reference": [], "triton": ["packages/flash-triton"], "cuda": ["packages/flash-cuda[nvrtc]"]}
ALL_BACKENDS = [pkg for pkgs in BACKEND_PACKAGES.values() for pkg in pkgs]
BENCH = "packages/flash-bench"
TEST_TOOLS = ["pytest>=8", "pytest-xdist>=3", "numpy"]
#: The transformers release the client tests run against (the GPU machine's; 5.4 is the oldest supported).
TRANSFORMERS = "transformers==5.17.0"
RUFF = "ruff==0.17.5"
MYPY = "mypy==2.4.1"


def has_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


def test_env() -> dict[str, str]:
    """Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors."""
    return {} if has_gpu() else {"TRITON_INTERPRET": "1"}


def install(session: nox.Session, *packages: str) -> None:
    session.install(TORCH)
    editable = [arg for pkg in (CORE, *packages) for arg in ("-e", pkg)]
    session.install(*editable, *TEST_TOOLS)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting; mypy over every package (mypy.ini), against the installed torch
    and transformers (the integration is type-checked against the release the tests use)."""
    install(session, *ALL_BACKENDS, BENCH)
    session.install(RUFF, MYPY, TRANSFORMERS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """Every test that can run on this machine, with every backend, the benchmarks and transformers
    installed; spread over the machine's cores (pytest-xdist), a case's tests kept in one worker."""
    install(session, *ALL_BACKENDS, BENCH)
    session.install(TRANSFORMERS)
    parallel = ["-n", "auto", "--dist", "loadgroup"]
    session.run("pytest", "tests", "-q", "-rs", *parallel, *session.posargs, env=test_env())


@nox.session
@nox.parametrize("backend", list(BACKEND_PACKAGES))
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite (and the backend's own tests) for one backend, installed alone with core."""
    install(session, *BACKEND_PACKAGES[backend])
    selection = ["tests/test_conformance.py", f"--backend={backend}"]
    own_tests = sorted(glob.glob(f"tests/backends/test_{backend}_*.py"))
    session.run("pytest", *selection, *own_tests, "-q", "-rs", *session.posargs, env=test_env())


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: python -m flash (on the GPU if there is one, else on the CPU)."""
    install(session, *ALL_BACKENDS)
    session.run("python", "-m", "flash", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (flash-bench): the device's default sections; ``nox -s bench -- --help`` for more."""
    install(session, *ALL_BACKENDS, BENCH)
    session.run("python", "-m", "flash", "bench", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The Sphinx site, warnings as errors, and the doctests of its examples."""
    install(session, *ALL_BACKENDS, BENCH)
    session.install("-r", "docs/requirements.txt")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest")
