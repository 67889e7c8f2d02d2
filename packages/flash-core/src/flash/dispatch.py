"""Choosing a backend for a problem, and explaining the choice.

``backend="auto"`` takes the highest-priority usable backend that supports the
problem. A backend can be forced per call (``backend="triton"``), per block
(:func:`use_backend`) or per process (``FLASH_BACKEND``), in that order of
precedence. A forced backend that cannot run the forward is an error, not a
silent fallback; a backward the forward's backend lacks comes from another
backend through the shared LSE contract.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from flash.backend import Backend
from flash.errors import BackendError, InvalidInputError, NoBackendError
from flash.registry import REGISTRY
from flash.spec import AttentionSpec

Pass = Literal["forward", "backward"]
ENV_BACKEND = "FLASH_BACKEND"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flash_forced_backend", default=None)


class _DecisionCache:
    """Dispatch decisions by problem; forgotten whenever the registry changes."""

    def __init__(self) -> None:
        self.generation = -1
        self.names: dict[tuple, str] = {}

    def get(self, key: tuple) -> str | None:
        if self.generation != REGISTRY.generation:
            self.names.clear()
            self.generation = REGISTRY.generation
        return self.names.get(key)


_decisions = _DecisionCache()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for the attention calls inside the ``with`` block."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError("name", "a backend name", repr(name))
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend(requested: str = "auto") -> tuple[str | None, str]:
    """(backend name or None, what forced it)."""
    if requested != "auto":
        return requested, "backend= argument"
    name = _forced.get()
    if name:
        return name, "flash.use_backend()"
    name = os.environ.get(ENV_BACKEND, "")
    if name and name != "auto":
        return name, f"{ENV_BACKEND}={name}"
    return None, ""


def _reasons(backend: Backend, spec: AttentionSpec, pass_: Pass) -> list[str]:
    try:
        check = backend.forward_reasons if pass_ == "forward" else backend.backward_reasons
        return list(check(spec))
    except Exception as error:
        return [f"support check failed: {type(error).__name__}: {error}"]


def rejection_reasons(name: str, spec: AttentionSpec, pass_: Pass) -> list[str]:
    """Why backend ``name`` cannot run ``pass_`` of ``spec``; empty when it can."""
    reasons = REGISTRY.unavailable_reasons(name)
    if reasons:
        return reasons
    return _reasons(REGISTRY.get(name), spec, pass_)


@dataclass(frozen=True)
class Decision:
    """The outcome of dispatch for one pass: the chosen backend and why the others were not."""

    pass_: Pass
    chosen: str | None
    forced_by: str
    considered: tuple[tuple[str, int | None, tuple[str, ...]], ...]  # (name, priority, reasons), by priority

    def __str__(self) -> str:
        head = f"{self.pass_}: " + (self.chosen or "no backend")
        if self.forced_by:
            head += f" (forced by {self.forced_by})"
        lines = [head]
        for name, priority, reasons in self.considered:
            mark = "->" if name == self.chosen else "  "
            status = "eligible" if not reasons else "; ".join(reasons)
            lines.append(f"  {mark} {name:<10} priority {priority if priority is not None else '-':>4}  {status}")
        return "\n".join(lines)


def _decide(spec: AttentionSpec, pass_: Pass, name: str | None, forced_by: str) -> Decision:
    considered = []
    chosen = None
    ordered = REGISTRY.by_priority()
    for candidate in ordered + [n for n in REGISTRY.names() if n not in ordered]:
        reasons = rejection_reasons(candidate, spec, pass_)
        try:
            priority: int | None = REGISTRY.priority(candidate)
        except BackendError:
            priority = None
        considered.append((candidate, priority, tuple(reasons)))
        if chosen is None and not reasons and (name is None or candidate == name):
            chosen = candidate
    if name is not None and name not in REGISTRY.names():
        considered.append((name, None, (f"no backend named {name!r} is installed",)))
    return Decision(pass_, chosen, forced_by, tuple(considered))


def decide(spec: AttentionSpec, pass_: Pass, requested: str = "auto") -> Decision:
    """Run dispatch for ``spec`` and record every backend's verdict (no exception when none fits)."""
    name, forced_by = forced_backend(requested)
    decision = _decide(spec, pass_, name, forced_by)
    if decision.chosen is None and name is not None and pass_ == "backward":
        # The forced backend has no backward for this problem: any backward honours the LSE contract.
        fallback = _decide(spec, pass_, None, "")
        if fallback.chosen is not None:
            return Decision(pass_, fallback.chosen, f"{forced_by}; {name} has no such backward", decision.considered)
    return decision


def _describe(spec: AttentionSpec) -> str:
    parts = [
        str(spec.dtype).replace("torch.", ""),
        f"{spec.device}",
        f"batch {spec.batch}" + (" (varlen)" if spec.varlen else ""),
        f"seqlen {spec.seqlen_q}x{spec.seqlen_k}",
        f"heads {spec.heads_q}/{spec.heads_kv}",
        f"head_dim {spec.head_dim}",
    ]
    parts += sorted(spec.features())
    return ", ".join(parts)


def select(spec: AttentionSpec, pass_: Pass, requested: str = "auto") -> Backend:
    """The backend that runs ``pass_`` of ``spec``; raises :class:`flash.errors.NoBackendError` listing every reason."""
    key = (spec, pass_, requested, _forced.get(), os.environ.get(ENV_BACKEND))
    name = _decisions.get(key)
    if name is None:
        decision = decide(spec, pass_, requested)
        if decision.chosen is None:
            raise NoBackendError(f"no backend can run the {pass_} of this problem ({_describe(spec)}):\n{decision}")
        name = _decisions.names[key] = decision.chosen
    return REGISTRY.get(name)


@dataclass(frozen=True)
class Explanation:
    """What :func:`flash.explain` returns: the problem, and the decision for each pass."""

    spec: AttentionSpec
    forward: Decision
    backward: Decision

    def __str__(self) -> str:
        return f"problem: {_describe(self.spec)}\n{self.forward}\n{self.backward}"


def explain(spec: AttentionSpec, requested: str = "auto") -> Explanation:
    """The dispatch decisions for the forward and the backward of ``spec`` (see :func:`flash.explain`)."""
    return Explanation(spec, decide(spec, "forward", requested), decide(spec, "backward", requested))
