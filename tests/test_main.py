"""The command line: the main job, ``check``, ``--version``, ``bench`` delegation and its errors.

Most tests call :func:`flash.cli.main` in this process (fast); the first runs ``python -m flash``
for real, as a user would.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import flash
from flash import cli
from flash.backend import Backend, ForwardArgs, Support
from flash.heuristics import KernelConfig
from flash.registry import ENTRY_POINT_GROUP, REGISTRY
from flash.spec import AttentionSpec


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flash", *args], capture_output=True, text=True, check=False)


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m flash ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(args))
    except SystemExit as stop:
        status = int(stop.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_main_job_checks_every_result_against_the_oracle():
    result = run("--device", "cpu", "--seqlens", "64,200")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"flash {flash.__version__} | torch ")
    assert "backends:" in lines and any(line.split()[:1] == ["reference"] for line in lines)
    assert "4/4 results within tolerance" in result.stdout
    header = next(line for line in lines if line.lstrip().startswith("seqlen"))
    assert header.split()[:3] == ["seqlen", "mask", "backend"] and "naive ms" in header
    rows = [line for line in lines if line.endswith(" ok")]
    assert len(rows) == 4 and {row.split()[0] for row in rows} == {"64", "200"}
    assert max(map(len, lines)) <= 100, max(lines, key=len)


def test_version_names_core_every_backend_and_torch(capsys):
    status, out, _ = call(capsys, "--version")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"flash-core {flash.__version__}" and lines[-1] == f"torch {torch.__version__}"
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None and ep.dist.name != "flash-core":
            assert f"{ep.dist.name} {ep.dist.version} (backend {ep.name})" in lines


@pytest.mark.parametrize(
    "args",
    [
        ["--seqlens", "64,x"],
        ["--seqlens", "0"],
        ["demo", "--backend", "no-such-backend"],
        ["--device", "tpu"],
        ["frob"],
        ["demo", "--frob"],
        ["check", "--backends", "reference,no-such-backend"],
        ["bench", "--backends", "no-such-backend"],
        ["bench", "--sections", "no-such-section"],
        ["bench", "--overhead-calls", "0"],
        ["bench", "--peers", "sdpa-flash,no-such-peer"],
        ["bench", "--cpu", "--sections", "attention"],  # a GPU section asked to run on the CPU
    ],
)
def test_a_bad_argument_is_one_line_and_exit_status_2(capsys, args):
    status, out, err = call(capsys, *args)
    assert status == 2
    assert out == "" and err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err


def test_an_unknown_backend_error_lists_the_installed_ones(capsys):
    _, _, err = call(capsys, "--backend", "nope")
    assert "unknown backend 'nope'" in err and all(name in err for name in REGISTRY.names())


def test_a_cuda_device_that_is_not_there_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status, _, err = call(capsys, "--device", "cuda")
    assert status == 2 and "no CUDA device" in err


@pytest.mark.parametrize("where", ["missing-folder/out.json", "."])
def test_bench_out_is_checked_before_anything_runs(capsys, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    status, out, err = call(capsys, "bench", "--cpu", "--sections", "cpu", "--out", where)
    assert status == 2 and out == "" and "--out" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_without_flash_bench_says_how_to_install_it(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_bench" else real(name))
    status, out, err = call(capsys, "bench")
    assert status == 1 and out == ""
    assert "flash-bench" in err and "pip install" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- check


class _Wrong(Backend):
    """Registers like a backend, runs the check's problem, and returns zeros: ``check`` must catch it."""

    name = "wrong"
    priority = -100
    forward_support = Support(
        dtypes=frozenset({torch.bfloat16}), features=frozenset({"causal", "gqa"}), devices=frozenset({"cpu"})
    )

    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: KernelConfig) -> None:
        args.out.zero_()
        args.lse.zero_()


class _Absent(_Wrong):
    name = "absent"

    def unavailable_reasons(self) -> list[str]:
        return ["needs hardware this machine lacks"]


@pytest.fixture
def registered():
    names = []

    def register(backend: Backend) -> None:
        REGISTRY.register(backend)
        names.append(backend.name)

    yield register
    for name in names:
        REGISTRY.unregister(name)


def test_check_runs_the_reference_backend_against_the_oracle(capsys):
    status, out, _ = call(capsys, "check", "--backends", "reference", "--device", "cpu")
    assert status == 0, out
    assert "reference  on cpu: forward ok, backward ok" in out
    assert out.rstrip().endswith("1 passed, 0 failed")
    assert max(map(len, out.splitlines())) <= 100


def test_check_fails_on_a_wrong_backend(capsys, registered):
    registered(_Wrong())
    status, out, _ = call(capsys, "check", "--backends", "reference,wrong", "--device", "cpu")
    assert status == 1
    assert "wrong      on cpu: FAILED: AssertionError" in out and "1 passed, 1 failed" in out


def test_check_lists_an_unusable_backend_with_its_reason(capsys, registered):
    registered(_Absent())
    status, out, _ = call(capsys, "check", "--backends", "reference", "--device", "cpu")
    assert status == 0  # not asked for by name: listed, not a failure
    assert "absent" in out and "needs hardware this machine lacks" in out
    status, out, _ = call(capsys, "check", "--backends", "absent", "--device", "cpu")
    assert status == 1 and "absent     not run: unusable here" in out
