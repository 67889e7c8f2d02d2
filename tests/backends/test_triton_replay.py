"""flash-triton's launch replay (:mod:`flash_triton.replay`): launches after a signature's first call
skip ``JITFunction.run`` and must launch exactly what it would have.

The check runs in its own process, without ``TRITON_INTERPRET`` (replay is off in the interpreter), on
a faked Triton driver: no GPU needed. See tests/backends/triton_replay_check.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("flash_triton")
pytest.importorskip("flash_bench")

from flash_triton import replay


def test_replays_launch_what_triton_would() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = Path(__file__).with_name("triton_replay_check.py")
    command = [sys.executable, "-W", "ignore", str(check)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("skip:"):
        pytest.skip(result.stdout.strip())
    assert "all replay checks passed" in result.stdout


def test_no_replay_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not replay.enabled()
