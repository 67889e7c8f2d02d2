"""Launching a call's kernels again without Triton's per-call binding.

``JITFunction.run`` binds and specialises every argument (about 45 per attention kernel), builds a
cache key and looks the compiled kernel up on every launch: most of a small call's host time. Yet
for one spec, configuration and set of tensor layouts, the kernels, grids and every argument but the
call's tensors are the same each time. So the first call of such a *signature* runs as usual through
``JITFunction.run`` while a :class:`Recorder` notes each launch (the compiled kernel it returned,
the grid, the arguments in signature order, and where the call's tensors sit among them); later calls
with the same signature launch the recorded compiled kernels directly with their own tensors
(:func:`replay`), as ``JITFunction.run`` itself ends.

The signature holds everything Triton specialises a launch on that can change from call to call:
each tensor's dtype and 16-byte alignment (Triton's pointer specialisation), its strides (integer
arguments, specialised on being 1 or a multiple of 16), the spec and configuration objects (every
other integer, float and constexpr derives from them), the current device, and the Triton knobs
``JITFunction.run`` adds to its key. A launch is recorded only when every argument is either one of
the call's tensors or a plain constant (no TMA descriptor, no mask tensor, no tensor made inside the
launch code), and only under the Triton versions whose launch code this mirrors; otherwise, and in
the interpreter, every call takes ``JITFunction.run``.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

#: Triton versions whose ``JITFunction.run`` ends the way :func:`replay` launches (read in 3.6 and 3.9).
TRITON_VERSIONS = ((3, 6), (3, 9))
#: Signatures kept; the cache is emptied when full (each holds a spec and its compiled kernels' handles).
MAX_SIGNATURES = 512

Tensors = tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton ran it."""

    kernel: Any  # triton.compiler.CompiledKernel
    grid: tuple[int, int, int]
    args: tuple[Any, ...]  # every kernel parameter, in signature order, constexprs included (None in slots)
    slots: tuple[tuple[int, int], ...]  # (position in args, index in the call's tensors)


@dataclass(frozen=True)
class Recording:
    """What a call of one signature launched, and what its launch function returned."""

    pins: tuple[Any, ...]  # the spec and configuration whose ids the signature holds, kept alive
    launches: tuple[Launch, ...]
    result: Any


_recordings: dict[tuple, Recording] = {}
_lock = threading.Lock()


@functools.cache
def _supported() -> bool:
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    low, high = TRITON_VERSIONS
    return low <= version <= high


@functools.cache
def _gpu() -> bool:
    """A CUDA GPU: without one there is no driver to launch through (Triton's compiler may still be
    driven by hand, as scripts/compile_report.py does)."""
    return torch.cuda.is_available()


def enabled() -> bool:
    """Whether calls may replay: a supported Triton, on a GPU (never in the interpreter)."""
    from flash_triton import runtime

    return _supported() and _gpu() and not runtime.interpreting()


def _knobs() -> tuple[Any, ...] | None:
    """The Triton settings ``JITFunction.run`` keys its kernels on; None when a hook it runs is set."""
    from triton import knobs

    if knobs.runtime.add_stages_inspection_hook is not None:
        return None
    return (
        knobs.runtime.debug,
        knobs.compilation.instrumentation_mode,
        getattr(knobs.compilation, "fpsan_homomorphic_casts", None),
    )


def _device() -> int:
    from triton.runtime import driver

    return driver.active.get_current_device()


def signature(pass_: str, pins: tuple[Any, ...], tensors: Tensors) -> tuple | None:
    """The key of a call's launches (None: this call cannot replay)."""
    knobs = _knobs()
    if knobs is None:
        return None
    layouts = tuple(None if t is None else (t.dtype, t.stride(), t.data_ptr() % 16 == 0) for t in tensors)
    return (pass_, *map(id, pins), _device(), knobs, layouts, _aliases(tensors))


def _aliases(tensors: Tensors) -> tuple[int, ...] | None:
    """Which of a call's tensors are one object (``attention(x, x, x)``, a KV-cache step given the same
    tensor as k and v), as each present tensor's first position; None when all are distinct. A
    recording finds its tensors among the arguments by identity, so it serves only calls whose tensors
    alias alike."""
    ids = [id(t) for t in tensors if t is not None]
    if len(set(ids)) == len(ids):
        return None
    return tuple(ids.index(i) for i in ids)


def find(key: tuple | None) -> Recording | None:
    return None if key is None else _recordings.get(key)


def replay(recording: Recording, tensors: Tensors) -> Any:
    """Launch ``recording``'s kernels on this call's ``tensors``; returns what its launch function returned."""
    from triton import knobs
    from triton.runtime import driver

    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    for launch in recording.launches:
        args = list(launch.args)
        for position, index in launch.slots:
            args[position] = tensors[index]
        kernel = launch.kernel
        metadata = kernel.launch_metadata(launch.grid, stream, *args)
        kernel.run(
            *launch.grid, stream, kernel.function, kernel.packed_metadata, metadata,
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args,
        )  # fmt: skip
    return recording.result


def _constant(value: Any) -> bool:
    """True for an argument that is the same on every call of a signature (never a tensor or descriptor)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, tuple):
        return all(_constant(v) for v in value)
    from triton.runtime.jit import JITFunction

    return isinstance(value, JITFunction)  # a constexpr device function (a translated score_mod)


class Recorder:
    """Runs a call's kernels through ``JITFunction.run``, noting each launch for :func:`replay`."""

    def __init__(self, key: tuple | None, tensors: Tensors) -> None:
        # Tensors are found among the arguments by identity; one object in two roles goes to its first
        # position, which is right for every call of the signature (it holds the aliasing).
        self.usable = key is not None
        self.key, self.tensors, self.launches = key, tensors, list[Launch]()

    def run(self, fn: Any, grid: tuple[int, int, int], *args: Any, **kwargs: Any) -> None:
        """``fn[grid](*args, **kwargs)``, recorded."""
        kernel = fn[grid](*args, **kwargs)
        if self.usable:
            self._note(fn, kernel, grid, args, kwargs)

    def _note(self, fn: Any, kernel: Any, grid: tuple[int, int, int], args: tuple, kwargs: dict[str, Any]) -> None:
        if kernel is None or fn.pre_run_hooks or not hasattr(kernel, "run"):  # a hook, or an asynchronous compile
            self.usable = False
            return
        bound = list(args)
        for param in fn.params[len(args) :]:
            if param.name in kwargs:
                bound.append(kwargs[param.name])
            elif param.has_default:
                bound.append(param.default)
            else:
                self.usable = False
                return
        slots = []
        for position, value in enumerate(bound):
            if isinstance(value, torch.Tensor):
                index = next((i for i, t in enumerate(self.tensors) if t is value), None)
                if index is None:
                    self.usable = False  # a tensor of the launch code's own (a mask's block list, a buffer)
                    return
                slots.append((position, index))
                bound[position] = None  # filled per call: the recording must not keep this call's memory alive
            elif not _constant(value):
                self.usable = False  # a TMA descriptor, made per call from its tensor
                return
        self.launches.append(Launch(kernel, grid, tuple(bound), tuple(slots)))

    def keep(self, pins: tuple[Any, ...], result: Any) -> None:
        """Store the recording under the call's signature (if every launch could be recorded)."""
        if not self.usable or not self.launches or self.key is None:
            return
        with _lock:
            if len(_recordings) >= MAX_SIGNATURES:
                _recordings.clear()
            _recordings[self.key] = Recording(pins, tuple(self.launches), result)


def forget() -> None:
    """Drop every recording (tests)."""
    with _lock:
        _recordings.clear()
