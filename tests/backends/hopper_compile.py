"""What the Hopper kernels' CPU-tier tests share: compiling every variant with NVRTC and ptxas's
report, and reading a cubin's SASS (no GPU needed for either)."""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from flash_cuda import nvrtc

Compiled = tuple[nvrtc.Resources, bytes, str]  # ptxas's report of the kernel, the cubin, the log


def compile_variant(source: Callable[[Any], str], kernel_name: str, variant: Any) -> Compiled:
    """``variant`` (with ``options()`` and ``label()``) compiled from ``source(variant)`` as the launch
    does, plus ptxas's resource report of ``kernel_name``."""
    compiled = nvrtc.compile_cubin(source(variant), (*variant.options(), "-ftz=true", "-Xptxas=-v"))
    report = nvrtc.parse_ptxas(compiled.log)
    assert kernel_name in report, f"no ptxas report for {variant.label()}:\n{compiled.log}"
    return report[kernel_name], compiled.cubin, compiled.log


def compile_all(variants: Sequence[Any], source: Callable[[Any], str], kernel_name: str) -> dict[Any, Compiled]:
    """Every variant compiled (skips without NVRTC). Processes, not threads: ptxas's -v report reaches
    NVRTC's log through process-wide state."""
    reason = nvrtc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    one = functools.partial(compile_variant, source, kernel_name)
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(variants, pool.map(one, variants)))


def _disassembler() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    candidates = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return candidates[0] if candidates else None


def sass(cubin: bytes) -> str:
    """The SASS of a cubin, by cuobjdump (CUDA toolkit or Triton's wheel); skips without one."""
    tool = _disassembler()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel) to read the SASS")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([tool, "-sass", fh.name], capture_output=True, text=True, check=True).stdout
