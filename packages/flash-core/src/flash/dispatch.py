"""Choosing a backend for a problem, and explaining the choice.

``backend="auto"`` takes the first usable backend that supports the problem, trying them in
the order measured fastest for the problem's class (:mod:`flash.heuristics.ranking`), else by
priority. A backend can be forced per call (``backend="triton"``), per block
(:func:`use_backend`) or per process (``FLASH_BACKEND``), in that order of
precedence. A forced backend that cannot run the forward is an error, not a
silent fallback, and forcing one never loads the other plugins; a backward the
forward's backend lacks comes from another backend through the shared LSE
contract (and :func:`flash.explain` says so).

Decisions are cached per *support class*: the spec with the values no support
declaration reads (dropout seed and probability, scale, softcap value) normalised
away, in a bounded cache, so fresh seeds and new lengths cannot grow it without end.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from flash import support
from flash._cache import BoundedCache
from flash.backend import Backend, Pass
from flash.errors import BackendError, InvalidInputError, NoBackendError
from flash.heuristics.ranking import ranking_for
from flash.kvspec import KVCacheSpec
from flash.registry import REGISTRY
from flash.spec import AttentionSpec

Spec = AttentionSpec | KVCacheSpec

ENV_BACKEND = "FLASH_BACKEND"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flash_forced_backend", default=None)

_decisions: BoundedCache[tuple, str] = BoundedCache(1024)


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


def support_class(spec: Spec) -> Spec:
    """``spec`` without the values no support declaration reads: the key of cached decisions."""
    if isinstance(spec, KVCacheSpec):
        return dataclasses.replace(spec, scale=1.0, softcap=1.0 if spec.softcap else 0.0, num_splits=1)
    return dataclasses.replace(
        spec,
        dropout_seed=0,
        dropout_p=0.5 if spec.dropout_p else 0.0,
        scale=1.0,
        softcap=1.0 if spec.softcap else 0.0,
    )


def rejection_reasons(name: str, spec: Spec, pass_: Pass) -> list[str]:
    """Why backend ``name`` cannot run ``pass_`` of ``spec``; empty when it can."""
    if name not in REGISTRY.names():
        return [f"no backend named {name!r} is installed"]
    reasons = REGISTRY.unavailable_reasons(name)
    if reasons:
        return reasons
    return support.reasons(REGISTRY.get(name), spec, pass_)


@dataclass(frozen=True)
class Decision:
    """The outcome of dispatch for one pass: the chosen backend and why the others were not."""

    pass_: Pass
    chosen: str | None
    forced_by: str
    considered: tuple[tuple[str, int | None, tuple[str, ...]], ...]  # (name, priority, reasons), in order tried
    ranked_by: str = ""  # the measurement that ordered the candidates, if one did

    def __str__(self) -> str:
        head = f"{self.pass_}: " + (self.chosen or "no backend")
        if self.forced_by:
            head += f" (forced by {self.forced_by})"
        lines = [head]
        if self.ranked_by:
            lines.append(f"  order: fastest first, {self.ranked_by}")
        for name, priority, reasons in self.considered:
            mark = "->" if name == self.chosen else "  "
            status = "eligible" if not reasons else "; ".join(reasons)
            lines.append(f"  {mark} {name:<10} priority {priority if priority is not None else '-':>4}  {status}")
        return "\n".join(lines)


def _priority(name: str) -> int | None:
    try:
        return REGISTRY.priority(name)
    except BackendError:
        return None


def _verdict(name: str, spec: Spec, pass_: Pass) -> tuple[str, int | None, tuple[str, ...]]:
    return (name, _priority(name), tuple(rejection_reasons(name, spec, pass_)))


def _decide(spec: Spec, pass_: Pass, name: str | None, forced_by: str, survey: bool) -> Decision:
    """Evaluate the forced backend alone (unless ``survey``), or every backend by priority."""
    if name is not None and not survey:
        verdict = _verdict(name, spec, pass_)
        return Decision(pass_, None if verdict[2] else name, forced_by, (verdict,))
    ordered = REGISTRY.by_priority()
    ranked_by = ""
    ranking = None if REGISTRY.has_overrides() else ranking_for(spec, pass_)
    if ranking is not None:
        first = [n for n in ranking.order if n in ordered]
        ordered = first + [n for n in ordered if n not in first]
        ranked_by = str(ranking.provenance)
    considered = [_verdict(n, spec, pass_) for n in ordered + [n for n in REGISTRY.names() if n not in ordered]]
    if name is not None and name not in REGISTRY.names():
        considered.append((name, None, (f"no backend named {name!r} is installed",)))
    eligible = [n for n, _, reasons in considered if not reasons and (name is None or n == name)]
    return Decision(pass_, eligible[0] if eligible else None, forced_by, tuple(considered), ranked_by)


def decide(spec: Spec, pass_: Pass, requested: str = "auto", *, survey: bool = False) -> Decision:
    """Run dispatch for ``spec`` and record the verdicts (no exception when none fits).

    ``survey=True`` evaluates every installed backend even when one is forced (what
    :func:`flash.explain` shows); otherwise a forced backend is the only one loaded and asked.
    """
    name, forced_by = forced_backend(requested)
    decision = _decide(spec, pass_, name, forced_by, survey)
    if decision.chosen is None and name is not None and pass_ == "backward":
        # The forced backend has no backward for this problem: any backward honours the LSE contract.
        fallback = _decide(spec, pass_, None, "", survey=True)
        if fallback.chosen is not None:
            forced = f"{forced_by}; {name} has no such backward, so another backend's runs"
            return Decision(pass_, fallback.chosen, forced, decision.considered)
    return decision


def describe(spec: Spec) -> str:
    """One line naming the problem (dtype, device, sizes, options), for messages."""
    if isinstance(spec, KVCacheSpec):
        return spec.describe()
    parts = [
        str(spec.dtype).replace("torch.", ""),
        f"{spec.device}",
        f"batch {spec.batch}" + (" (varlen)" if spec.varlen else ""),
        f"seqlen {spec.seqlen_q}x{spec.seqlen_k}",
        f"heads {spec.heads_q}/{spec.heads_kv}",
        f"head_dim {spec.head_dim}",
    ]
    parts += sorted(spec.features())
    if spec.block_mask is not None:
        bm, bn = spec.block_mask.block_size
        parts.append(f"block density {spec.block_mask.density:.1%} of {bm}x{bn} blocks")
        if spec.block_mask.intervals:
            parts.append("every query sees one interval of keys")
        elif not spec.block_mask.partial:
            parts.append("no partial blocks")
        elif spec.block_mask.documents:
            parts.append("partial blocks compare document ids")
    if spec.key_padding:
        parts.append("key-padding mask (one row for every query)")
    if spec.mask_mod is not None and spec.block_mask is None:
        parts.append("mask_mod on every tile (a flash.BlockMask built from it would skip hidden tiles)")
    return ", ".join(parts)


def select(spec: Spec, pass_: Pass, requested: str = "auto") -> Backend:
    """The backend that runs ``pass_`` of ``spec``; raises :class:`flash.errors.NoBackendError` listing every reason."""
    name, forced_by = forced_backend(requested)
    key = (support_class(spec), pass_, name, forced_by)
    chosen = _decisions.get(key)
    if chosen is None:
        decision = decide(spec, pass_, requested)
        if decision.chosen is None:
            raise NoBackendError(f"no backend can run the {pass_} of this problem ({describe(spec)}):\n{decision}")
        chosen = decision.chosen
        _decisions.put(key, chosen)
    return REGISTRY.get(chosen)


@dataclass(frozen=True)
class Explanation:
    """What :func:`flash.explain` returns: the problem, and the decision for each pass."""

    spec: AttentionSpec
    forward: Decision
    backward: Decision

    def __str__(self) -> str:
        return f"problem: {describe(self.spec)}\n{self.forward}\n{self.backward}"


def explain(spec: AttentionSpec, requested: str = "auto") -> Explanation:
    """The dispatch decisions for the forward and the backward of ``spec`` (see :func:`flash.explain`)."""
    forward = decide(spec, "forward", requested, survey=True)
    backward = decide(spec, "backward", requested, survey=True)
    return Explanation(spec, forward, backward)


@dataclass(frozen=True)
class KVCacheExplanation:
    """What :func:`flash.explain_kvcache` returns: the call, and the decision for its KV-cache pass."""

    spec: KVCacheSpec
    decode: Decision

    def __str__(self) -> str:
        return f"problem: {describe(self.spec)}\n{self.decode}"


def explain_kvcache(spec: KVCacheSpec, requested: str = "auto") -> KVCacheExplanation:
    """The dispatch decision for the KV-cache pass of ``spec`` (see :func:`flash.explain_kvcache`)."""
    return KVCacheExplanation(spec, decide(spec, "decode", requested, survey=True))
