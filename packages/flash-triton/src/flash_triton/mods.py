"""User score and mask functions (:mod:`flash.mods`) translated into Triton device functions.

The user's function is re-bound to this module's Triton versions of :mod:`flash.mods`'s functions
(the same names, so ``mods.tanh`` or an imported ``tanh`` resolves here) and handed to
``triton.jit``; ints, floats and bools it reads from its module or closure become compile-time
constants. A probe kernel then calls it once with the argument types the attention kernels use,
so a body Triton cannot compile fails before any attention kernel, as an
:class:`~flash.errors.InvalidInputError` naming the argument. Results are cached per function.

Imported only by :mod:`flash_triton.launch`, after ``TRITON_INTERPRET`` is settled.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from flash import mods as torch_mods
from flash.errors import InvalidInputError
from flash_triton.runtime import interpreting

INTERPRETED = interpreting()


@triton.jit
def where(condition, x, y):
    return tl.where(condition, x, y)


@triton.jit
def exp(x):
    return tl.exp(x.to(tl.float32))


@triton.jit
def exp2(x):
    return tl.math.exp2(x.to(tl.float32))


@triton.jit
def log(x):
    return tl.log(x.to(tl.float32))


@triton.jit
def sqrt(x):
    return tl.sqrt(x.to(tl.float32))


@triton.jit
def tanh(x):
    e = tl.math.exp2(x.to(tl.float32) * 2.8853900817779268)  # 2 * log2(e): saturates to +-1, never NaN
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x.to(tl.float32)))


@triton.jit
def abs(x):
    return tl.abs(x)


@triton.jit
def minimum(x, y):
    return tl.minimum(x, y)


@triton.jit
def maximum(x, y):
    return tl.maximum(x, y)


_TRITON = {name: globals()[name] for name in torch_mods.names()}
_TORCH_TO_TRITON = {id(getattr(torch_mods, name)): fn for name, fn in _TRITON.items()}


def _constant(value: Any) -> Any:
    """A number as the kernel sees it: a constexpr when compiled (the interpreter runs plain Python)."""
    if isinstance(value, (bool, int, float)) and not INTERPRETED:
        return tl.constexpr(value)
    return value


def _rebound(fn: Callable[..., Any], module: types.ModuleType) -> Any:
    scope = dict(fn.__globals__)
    for name, value in list(scope.items()):
        if value is torch_mods:
            scope[name] = module
        elif id(value) in _TORCH_TO_TRITON:
            scope[name] = _TORCH_TO_TRITON[id(value)]
        elif name in fn.__code__.co_names:
            scope[name] = _constant(value)
    cells = fn.__closure__ or ()
    for name, cell in zip(fn.__code__.co_freevars, cells):
        value = cell.cell_contents
        scope[name] = module if value is torch_mods else _TORCH_TO_TRITON.get(id(value), _constant(value))
    scope["_flash_triton_language"] = tl  # triton.jit wants triton.language among a function's globals
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__ = fn.__module__
    copy.__qualname__ = fn.__qualname__
    return triton.jit(copy)


@triton.jit
def _probe_kernel(Out, FN: tl.constexpr, SCORE: tl.constexpr):
    rows = tl.arange(0, 16)[:, None]
    cols = tl.arange(0, 16)[None, :]
    b = tl.program_id(0)
    h = tl.program_id(1)
    if SCORE:
        value = FN(tl.zeros([16, 16], tl.float32) + rows, b, h, rows, cols).to(tl.float32)
    else:
        value = FN(b, h, rows, cols).to(tl.float32)
    tl.store(Out + rows * 16 + cols, tl.broadcast_to(value, [16, 16]))


@functools.cache
def _translated(fn: Callable[..., Any], argument: str, device: str) -> Any:
    import sys

    try:
        jitted = _rebound(fn, sys.modules[__name__])
        out = torch.empty(16, 16, dtype=torch.float32, device=device)
        _probe_kernel[(1, 1)](out, jitted, argument != "mask_mod")
    except InvalidInputError:
        raise
    except Exception as error:
        words = str(error).strip().splitlines()
        detail = words[-1] if words else type(error).__name__
        raise InvalidInputError(
            argument, "a function Triton can compile (contract: flash.mods)", f"{type(error).__name__}: {detail}"
        ) from error
    return jitted


def translated(fn: Callable[..., Any] | None, argument: str, device: torch.device) -> Any:
    """The Triton device function of user function ``fn`` (None stays None); raises InvalidInputError."""
    if fn is None:
        return None
    return _translated(fn, argument, device.type)
