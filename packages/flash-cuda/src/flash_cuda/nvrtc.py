"""NVRTC through ctypes: compile a variant to a cubin without a GPU and read ptxas's resource report.

The CPU test tier uses this to prove that every shipped kernel variant compiles for each target
and does not spill registers. It needs only ``libnvrtc`` (the ``nvidia-cuda-nvrtc`` wheel provides
it; no GPU, driver or CUDA toolkit). The GPU path compiles through CuPy instead
(:mod:`flash_cuda.compile`), with the same source and options.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_LIBRARY = "FLASH_CUDA_NVRTC"


class NvrtcError(RuntimeError):
    """NVRTC rejected the program; the message holds its log."""


def _candidates() -> list[str]:
    found = []
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        found.append(explicit)
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        # nvidia-cuda-nvrtc: nvidia/cu13/lib (CUDA 13 wheels) or nvidia/cuda_nvrtc/lib (CUDA 12 wheels)
        for pattern in ("cu13/lib/libnvrtc.so.*", "cuda_nvrtc/lib/libnvrtc.so.*", "*/lib/libnvrtc.so.*"):
            found += sorted(p for p in glob.glob(str(base / pattern)) if "builtins" not in p and "alt" not in p)
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    return found


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The first loadable libnvrtc, or None."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib._flash_path = path  # type: ignore[attr-defined]
        return lib
    return None


def unavailable_reason() -> str | None:
    if library() is None:
        return f"libnvrtc not found (pip install nvidia-cuda-nvrtc, or set {ENV_LIBRARY})"
    return None


def version() -> tuple[int, int]:
    lib = _require()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise NvrtcError(unavailable_reason() or "libnvrtc not found")
    return lib


def _check(lib: ctypes.CDLL, code: int, what: str, log: str = "") -> None:
    if code:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        name = lib.nvrtcGetErrorString(code).decode()
        raise NvrtcError(f"{what} failed: {name}\n{log}")


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    log: str


def compile_cubin(source: str, options: tuple[str, ...], name: str = "flash_fwd.cu") -> Compiled:
    """Compile ``source`` with ``options`` (which must name a real ``-arch=sm_XX``) to a cubin."""
    lib = _require()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    try:
        encoded = [o.encode() for o in options]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        code = lib.nvrtcCompileProgram(prog, len(encoded), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buffer)
        log = buffer.value.decode(errors="replace")
        _check(lib, code, "nvrtcCompileProgram " + " ".join(options), log)
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize", log)
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN", log)
        return Compiled(cubin.raw, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@dataclass(frozen=True)
class Resources:
    """ptxas's report for one kernel."""

    function: str
    arch: str
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    barriers: int

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Per-kernel resources from a ``-Xptxas=-v`` log."""
    out: dict[str, Resources] = {}
    function = arch = None
    frame: tuple[int, int, int] | None = None
    for line in log.splitlines():
        m = _COMPILING.search(line)
        if m:
            function, arch, frame = m.group(1), m.group(2), None
            continue
        m = _FRAME.search(line)
        if m and function:
            frame = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and function and arch:
            stack, stores, loads = frame or (0, 0, 0)
            barriers = int(m.group(2) or 0)
            out[function] = Resources(function, arch, int(m.group(1)), stack, stores, loads, barriers)
    return out
