"""Run-time compilation through CuPy: one ``cupy.RawModule`` per kernel variant and device.

CuPy compiles with NVRTC and keeps every cubin in its disk cache (``$CUPY_CACHE_DIR``, default
``~/.cupy/kernel_cache``), keyed by a hash of the source, the options and the NVRTC version. The
kernel is a plain ``extern "C"`` symbol, so no ``name_expressions`` are passed: CuPy skips its disk
cache whenever name expressions are given (it must recompile to learn the mangled names), which
would make every new process pay the compile again. In this process each variant is compiled or
loaded once and kept in :data:`_kernels`.
"""

from __future__ import annotations

import threading
from typing import Any

from flash_cuda.variants import KERNEL_NAME, Variant, source

_kernels: dict[tuple[Variant, int], Any] = {}
_lock = threading.Lock()
#: How each variant was built, for tests and diagnostics: "arch" (our -arch) or "cupy-arch".
build_notes: dict[tuple[Variant, int], str] = {}


def _build(variant: Variant) -> tuple[Any, str]:
    import cupy

    code = source()
    try:
        module = cupy.RawModule(code=code, options=variant.options(arch=True), backend="nvrtc")
        return module.get_function(KERNEL_NAME), "arch"
    except cupy.cuda.compiler.CompileException as first:
        # An NVRTC that does not know our target name (a newer GPU than this code knows, say):
        # let CuPy choose the target for the current device. mma.sync code runs on every sm_80+.
        try:
            module = cupy.RawModule(code=code, options=variant.options(arch=False), backend="nvrtc")
            return module.get_function(KERNEL_NAME), f"cupy-arch (ours failed: {str(first).splitlines()[0][:200]})"
        except cupy.cuda.compiler.CompileException:
            raise first from None


def kernel(variant: Variant, device_index: int) -> Any:
    """The compiled ``cupy.RawKernel`` of ``variant`` on CUDA device ``device_index``."""
    key = (variant, device_index)
    found = _kernels.get(key)
    if found is not None:
        return found
    import cupy

    with _lock:
        found = _kernels.get(key)
        if found is None:
            with cupy.cuda.Device(device_index):
                found, note = _build(variant)
                if variant.smem_bytes > 48 * 1024:
                    found.max_dynamic_shared_size_bytes = variant.smem_bytes
            _kernels[key] = found
            build_notes[key] = note
    return found


def clear() -> None:
    """Forget the compiled kernels of this process (CuPy's disk cache stays)."""
    with _lock:
        _kernels.clear()
        build_notes.clear()
