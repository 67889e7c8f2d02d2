"""Backend discovery through the ``flash.backends`` entry-point group.

Entry points are read from package metadata without importing anything; a
backend's module is imported the first time dispatch needs it. A backend that
fails to import, or that was built for another plugin API, stays listed with the
reason, so ``flash.backends()`` and error messages can say what is wrong.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib import metadata

from flash.backend import PLUGIN_API_VERSION, Backend
from flash.errors import BackendError

ENTRY_POINT_GROUP = "flash.backends"
#: The distributions that own the first-party names: another package registering one of these
#: names is ignored (and reported), whatever order the entry points come in.
FIRST_PARTY = {"reference": "flash-core", "triton": "flash-triton", "cuda": "flash-cuda"}
#: What a plugin may raise while it loads or answers without taking flash down with it.
PLUGIN_ERRORS = (Exception, SystemExit)


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else ""


@dataclass(frozen=True)
class BackendInfo:
    """What ``flash.backends()`` reports about one installed backend."""

    name: str
    version: str | None
    distribution: str | None  # the package that registered it; None if registered in code
    priority: int | None
    usable: bool
    reasons: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        where = f"{self.distribution} {self.version}" if self.distribution else f"in-process {self.version or ''}"
        status = "usable" if self.usable else "unusable: " + "; ".join(self.reasons)
        return (
            f"{self.name:<10} priority {self.priority if self.priority is not None else '-':>4}  {where:<24} {status}"
        )


class Registry:
    """The process-wide set of backends. Thread-safe; loads each backend at most once."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entry_points: dict[str, metadata.EntryPoint] | None = None
        self._shadowed: list[metadata.EntryPoint] = []
        self._backends: dict[str, Backend] = {}
        self._load_errors: dict[str, str] = {}
        self._unavailable: dict[str, list[str]] = {}
        self._priorities: dict[str, int] = {}  # the user's overrides
        self._own_priorities: dict[str, int] = {}  # read once, when the backend loads
        #: Bumped on every change, so dispatch caches know to forget their decisions.
        self.generation = 0

    # ----------------------------------------------------------------- discovery

    def _discovered(self) -> dict[str, metadata.EntryPoint]:
        if self._entry_points is None:
            with self._lock:
                if self._entry_points is None:
                    self._entry_points, self._shadowed = _choose(metadata.entry_points(group=ENTRY_POINT_GROUP))
        return self._entry_points

    def shadowed(self) -> list[metadata.EntryPoint]:
        """Entry points ignored because another distribution owns their name (first-party first)."""
        self._discovered()
        return list(self._shadowed)

    def names(self) -> list[str]:
        """Every registered backend name (entry points and in-process registrations), unsorted."""
        return sorted(set(self._discovered()) | set(self._backends))

    def refresh(self) -> None:
        """Forget everything and re-read the entry points (after installing a backend at run time)."""
        with self._lock:
            self._entry_points = None
            self._backends.clear()
            self._load_errors.clear()
            self._unavailable.clear()
            self._own_priorities.clear()
            self.generation += 1

    # ----------------------------------------------------------------- loading

    def _load(self, name: str) -> Backend | None:
        ep = self._discovered().get(name)
        if ep is None:
            return None
        try:
            target = ep.load()
            backend = target() if callable(target) and not isinstance(target, Backend) else target
            problem = _incompatibility(name, backend)
        except PLUGIN_ERRORS as error:  # a broken plugin (even one calling sys.exit) must not break flash
            self._load_errors[name] = f"failed to load {ep.value}: {type(error).__name__}: {error}"
            return None
        if problem:
            self._load_errors[name] = problem
            return None
        return backend

    def get(self, name: str) -> Backend:
        """The backend called ``name``, loading it if needed.

        Raises :class:`flash.errors.BackendError` with the reason when it cannot be loaded."""
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        with self._lock:
            if name not in self._backends and name not in self._load_errors:
                loaded = self._load(name)
                if loaded is not None:
                    self._backends[name] = loaded
                    self._own_priorities[name] = loaded.priority
            if name in self._backends:
                return self._backends[name]
        if name in self._load_errors:
            raise BackendError(f"backend {name!r}: {self._load_errors[name]}")
        raise BackendError(f"no backend named {name!r}; installed: {', '.join(self.names()) or 'none'}")

    def register(self, backend: Backend) -> None:
        """Register a backend object in this process (tests, or a plugin without packaging)."""
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name:
            raise BackendError(f"cannot register {backend!r}: a backend has a non-empty str attribute 'name'")
        problem = _incompatibility(name, backend)
        if problem:
            raise BackendError(problem)
        with self._lock:
            self._backends[name] = backend
            self._own_priorities[name] = backend.priority
            self._load_errors.pop(name, None)
            self._unavailable.pop(name, None)
            self.generation += 1

    def unregister(self, name: str) -> None:
        """Forget backend ``name`` in this process (entry point included)."""
        with self._lock:
            self._backends.pop(name, None)
            self._unavailable.pop(name, None)
            if self._entry_points is not None:
                self._entry_points.pop(name, None)
            self.generation += 1

    # ----------------------------------------------------------------- status

    def unavailable_reasons(self, name: str) -> list[str]:
        """Why backend ``name`` cannot run on this machine (load errors included); empty when usable."""
        if name in self._unavailable:
            return self._unavailable[name]
        try:
            backend = self.get(name)
        except BackendError as error:
            return [str(error).split(": ", 1)[-1]]
        try:
            reasons = [str(r) for r in backend.unavailable_reasons()]
        except PLUGIN_ERRORS as error:
            reasons = [f"availability check failed: {type(error).__name__}: {error}"]
        self._unavailable[name] = reasons
        return reasons

    def priority(self, name: str) -> int:
        """Backend ``name``'s dispatch priority: the user's override, else its own."""
        if name in self._priorities:
            return self._priorities[name]
        self.get(name)
        return self._own_priorities[name]

    def set_priority(self, name: str, priority: int | None) -> None:
        """Override a backend's dispatch priority (``None`` restores its own)."""
        with self._lock:
            if priority is None:
                self._priorities.pop(name, None)
            else:
                self._priorities[name] = priority
            self.generation += 1

    def has_overrides(self) -> bool:
        """Whether the user overrode any backend's priority in this process."""
        return bool(self._priorities)

    def by_priority(self) -> list[str]:
        """Names of the backends that load, highest priority first (ties by name)."""
        loadable = []
        for name in self.names():
            try:
                loadable.append((-self.priority(name), name))
            except BackendError:
                continue
        return [name for _, name in sorted(loadable)]

    def info(self, name: str) -> BackendInfo:
        """What :func:`flash.backends` reports about backend ``name``."""
        ep = self._discovered().get(name)
        dist = ep.dist.name if ep is not None and ep.dist is not None else None
        reasons = self.unavailable_reasons(name)
        try:
            backend = self.get(name)
            version: str | None = backend.version
            priority: int | None = self.priority(name)
        except BackendError:
            version = ep.dist.version if ep is not None and ep.dist is not None else None
            priority = None
        return BackendInfo(name, version, dist, priority, not reasons, tuple(reasons))

    def shadowed_infos(self) -> list[BackendInfo]:
        """What :func:`flash.backends` reports about entry points shadowed by another owner of their name."""
        infos = []
        for ep in self.shadowed():
            owner = self._discovered()[ep.name]
            reason = f"the name {ep.name!r} belongs to {_dist_name(owner) or owner.value}; this entry point is ignored"
            version = ep.dist.version if ep.dist is not None else None
            infos.append(BackendInfo(ep.name, version, _dist_name(ep) or None, None, False, (reason,)))
        return infos


def _choose(found: metadata.EntryPoints) -> tuple[dict[str, metadata.EntryPoint], list[metadata.EntryPoint]]:
    """One entry point per name: the first-party owner of a first-party name, else the first by
    distribution name; the others are returned as shadowed (an editable install listed twice is
    the same entry point, not a collision)."""
    chosen: dict[str, metadata.EntryPoint] = {}
    shadowed = []

    def rank(ep: metadata.EntryPoint) -> tuple[str, bool, str]:
        return ep.name, _dist_name(ep) != FIRST_PARTY.get(ep.name), _dist_name(ep)

    for ep in sorted(found, key=rank):
        kept = chosen.setdefault(ep.name, ep)
        if kept is not ep and (_dist_name(kept), kept.value) != (_dist_name(ep), ep.value):
            shadowed.append(ep)
    return chosen, shadowed


def _incompatibility(name: str, backend: object) -> str | None:
    """Why ``backend`` cannot be used with this flash-core, or None."""
    api = getattr(backend, "plugin_api", None)
    if api != PLUGIN_API_VERSION:
        return (
            f"built for flash plugin API {api}, but this flash-core speaks API {PLUGIN_API_VERSION}; "
            "install versions of flash-core and the backend that match"
        )
    for method in ("forward", "backward", "unavailable_reasons", "extra_reasons"):
        if not callable(getattr(backend, method, None)):
            return f"does not implement {method}() of the flash backend API"
    if getattr(backend, "name", None) != name:
        return f"calls itself {getattr(backend, 'name', None)!r} but is registered as {name!r}"
    priority = getattr(backend, "priority", None)
    if isinstance(priority, bool) or not isinstance(priority, int):
        return f"priority {priority!r} is not an int"
    if not hasattr(backend, "forward_support"):
        return "declares no forward_support"
    return None


REGISTRY = Registry()
