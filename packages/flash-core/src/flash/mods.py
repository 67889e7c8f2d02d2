"""User score and mask functions: the contract, and the functions they may call.

A *score function* ``score_mod(score, b, h, q_idx, kv_idx) -> score`` rewrites each attention
score; a *mask function* ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx``
sees key ``kv_idx`` (True: visible). ``b`` is the sequence, ``h`` the query head, ``q_idx`` and
``kv_idx`` positions inside the sequence (0-based, top-left: ``q_idx`` is *not* shifted by the
bottom-right offset the causal mask uses).

The same Python function runs in two places: on torch tensors (the reference backend, the
float64 oracle) and inside a Triton kernel (the ``triton`` backend translates it with
``triton.jit``). So its body may use only what both understand:

* arithmetic and comparison operators (``+ - * / // % ** < <= == != >= >``, ``& | ~`` on
  booleans), literals, and parentheses;
* the functions of this module, called as ``mods.where(...)`` or imported by name;
* names of ints, floats and bools from its module or its closure (compile-time constants: a
  new value means a new function, e.g. one made by a factory per window size).

No ``if`` on tensor values, no Python ``and``/``or``/``not`` (use ``& | ~``), no indexing of
captured tensors, no calls of other Python functions. Arguments arrive as tensors that
broadcast against each other: ``score`` is a float tile, ``q_idx`` and ``kv_idx`` are integer
tensors, ``b`` and ``h`` integer scalars (tensors in the reference). A score function must
return a float tensor of the score's shape, a mask function a boolean one.

A score function used in training needs its derivative ``d score_mod / d score`` with the same
signature (``score_mod_grad=``); the Triton backward multiplies it in. Without one, the backward
runs on the reference backend, which differentiates the function with torch autograd
(``flash.explain`` says so).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["abs", "exp", "exp2", "log", "maximum", "minimum", "sigmoid", "sqrt", "tanh", "where"]

_NAMES = tuple(__all__)


def _t(x: object, like: object = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.as_tensor(x, device=device)


def where(condition: torch.Tensor, x: object, y: object) -> torch.Tensor:
    """``x`` where ``condition`` holds, else ``y`` (elementwise, broadcasting)."""
    like = x if isinstance(x, torch.Tensor) else y
    return torch.where(_t(condition), _t(x, like if isinstance(like, torch.Tensor) else condition), _t(y, condition))


def _unary(name: str, op: Callable[[torch.Tensor], torch.Tensor], doc: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return op(_t(x))

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


exp = _unary("exp", torch.exp, "``e ** x``.")
exp2 = _unary("exp2", torch.exp2, "``2 ** x``.")
log = _unary("log", torch.log, "Natural logarithm.")
sqrt = _unary("sqrt", torch.sqrt, "Square root.")
tanh = _unary("tanh", torch.tanh, "Hyperbolic tangent.")
sigmoid = _unary("sigmoid", torch.sigmoid, "``1 / (1 + exp(-x))``.")
abs = _unary("abs", torch.abs, "Absolute value (integers stay integers).")


def minimum(x: object, y: object) -> torch.Tensor:
    """Elementwise minimum."""
    return torch.minimum(_t(x, y), _t(y, x))


def maximum(x: object, y: object) -> torch.Tensor:
    """Elementwise maximum."""
    return torch.maximum(_t(x, y), _t(y, x))


def names() -> tuple[str, ...]:
    """The functions a mod may call (every backend that runs mods provides each of them)."""
    return _NAMES
