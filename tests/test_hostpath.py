"""flash-bench's CPU host-path harness (``python -m flash_bench.hostpath``) runs every row, the Triton and
flash-cuda launches behind their fake drivers included (in a process without ``TRITON_INTERPRET``:
the Triton kernels must be JIT functions, as on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("flash_bench")


def test_every_row_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-W", "ignore", "-m", "flash_bench.hostpath", "--calls", "20", "--repeats", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(line.rsplit(maxsplit=1) for line in done.stdout.splitlines()[1:])
    expected = {"core fwd", "core fwd+bwd", "sdpa fwd", "sdpa fwd+bwd"}
    for package, names in (("triton", ("triton launch fwd", "triton launch bwd")),
                           ("flash_cuda", ("cuda launch fwd", "cuda launch bwd"))):  # fmt: skip
        try:
            __import__(package)
            expected.update(names)
        except ImportError:
            pass
    assert expected <= {name.strip() for name in rows}, done.stdout
    assert all(float(us) > 0 for us in rows.values()), done.stdout


def test_cuda_rows_run_whatever_was_imported_first() -> None:
    """The fake CUDA driver reaches the backward's launch even when flash_cuda.hopper_bwd (which binds
    ``hopper.on_current_stream`` at import, as ``hopper_bwd.run``) was imported before it."""
    pytest.importorskip("flash_cuda")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import flash_cuda.hopper_bwd\n"
        "from flash_bench import hostpath\n"
        "times = hostpath.measure(calls=5, repeats=1, only='cuda launch')\n"
        "assert set(times) == {'cuda launch fwd', 'cuda launch bwd'}, times\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          check=False, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
