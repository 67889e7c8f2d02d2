"""Where and how the kernels run: interpreter or GPU, and the lazy import of the kernel modules.

``@triton.jit`` reads ``TRITON_INTERPRET`` when it *decorates* a function, so the kernel modules
are imported on first use, never when flash or this backend's class is loaded. If the variable
changes later in the process (tests do this), the kernel modules are reloaded so that their
functions are decorated again for the new mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import NamedTuple

_KERNEL_MODULES = (
    "flash_triton.tiles",
    "flash_triton.mods",
    "flash_triton.forward_kernel",
    "flash_triton.backward_kernels",
    "flash_triton.decode_kernels",
)
_lock = threading.Lock()


class Kernels(NamedTuple):
    forward: ModuleType
    backward: ModuleType
    mods: ModuleType
    decode: ModuleType


#: What :func:`kernels` returned last, per mode: every launch asks for the modules, and importing them
#: again (nine ``import_module`` calls) cost more host time than the launch itself.
_last: dict[bool, Kernels] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def mode_mismatch() -> str | None:
    """Why kernels cannot run in the current mode, if triton was imported in the other one.

    Triton's own library functions (``tl.zeros``, ``tl.max``, ``tl.sum``...) are decorated once, when
    triton is imported: a kernel interpreted with library functions compiled for the GPU (or the
    reverse) fails. So ``TRITON_INTERPRET`` must be set before triton is first imported.
    """
    language = sys.modules.get("triton.language")
    if language is None:
        return None  # triton will be imported now, in the current mode
    library_interpreted = type(language.zeros).__name__ == "InterpretedFunction"
    if library_interpreted == interpreting():
        return None
    if interpreting():
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before Python starts"
    return "triton was imported with TRITON_INTERPRET=1, which is no longer set; restart Python without it"


def kernels() -> Kernels:
    """The kernel modules, imported (or re-imported) for the current interpreter mode.

    Each kernel module records the mode it was decorated in (``INTERPRETED``); a module from
    the other mode is reloaded, dependencies first. On a GPU, once loaded, this is a cached
    tuple and four attribute reads (the interpreter also re-checks its patches on every call).
    """
    mode = interpreting()
    last = _last.get(mode)
    if not mode and last is not None and not any(module.INTERPRETED for module in last):
        return last
    with _lock:
        if mode:
            from flash_triton import interpreter_patch

            interpreter_patch.apply()
        stale = False
        for name in _KERNEL_MODULES:
            module = importlib.import_module(name)
            if stale or mode != module.INTERPRETED:
                importlib.reload(module)
                stale = True  # modules after it import its functions: decorate them again too
        loaded = Kernels(
            importlib.import_module("flash_triton.forward_kernel"),
            importlib.import_module("flash_triton.backward_kernels"),
            importlib.import_module("flash_triton.mods"),
            importlib.import_module("flash_triton.decode_kernels"),
        )
        _last[mode] = loaded
        return loaded
