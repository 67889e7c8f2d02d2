"""CUDA functions compiled at run time by NVRTC through CuPy, loaded once per (key, device).

CuPy keeps every cubin in its disk cache (keyed by source, options and NVRTC version), so a later
process loads instead of compiling; in this process each module is built once and kept, since a
function handle is valid only while its module lives. The Hopper kernels are launched through
:mod:`flash_cuda.tensor_map` (by-value tensor maps), so what is handed out are raw CUfunction handles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from flash_cuda import tensor_map

_loaded: dict[tuple[Hashable, int], tuple[tuple[int, ...], Any]] = {}
_lock = threading.Lock()


def functions(
    key: Hashable, device_index: int, build: Callable[[], tuple[str, tuple[str, ...]]], names: tuple[str, ...],
    smem: int = 0,
) -> tuple[int, ...]:  # fmt: skip
    """The CUfunctions ``names`` of the module that ``build()``'s (source, NVRTC options) compile to, on a
    device (``key`` names that module, ``build`` runs only to compile it; ``smem``: the dynamic shared
    memory each function opts in to)."""
    found = _loaded.get((key, device_index))
    if found is not None:
        return found[0]
    import cupy

    with _lock:
        found = _loaded.get((key, device_index))
        if found is None:
            code, options = build()
            with cupy.cuda.Device(device_index):
                module = cupy.RawModule(code=code, options=options, backend="nvrtc")
                raws = [module.get_function(name) for name in names]
                handles = tuple(int(raw.kernel.ptr) for raw in raws)
                for handle in handles if smem else ():
                    tensor_map.set_max_dynamic_shared(handle, smem)
            found = _loaded[(key, device_index)] = (handles, (module, raws))  # the module outlives its functions
    return found[0]
