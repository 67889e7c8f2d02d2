"""Autotuning: measure candidate configurations, cache the winners on disk as JSON.

Off unless ``FLASH_AUTOTUNE=1``. Then the first call of each problem class times the
candidates the backend proposes (:meth:`flash.backend.Backend.tuning_candidates`) and
every later call, in this process or another, uses the winner. A winner is keyed by the GPU's
name, the library versions (torch and its CUDA, flash-core, the backend and what its kernels
depend on: Triton, CuPy, the driver) and the problem class (dtype, head-dim bucket, causal,
sequence-length buckets, pass), so an upgrade re-tunes instead of trusting stale numbers.

The cache lives in ``$FLASH_CACHE_DIR`` (default ``~/.cache/flash``) as ``autotune.json``; it is
plain JSON, never pickle, so reading it cannot run code. It is never trusted: an entry is used
only if it parses as a configuration that fits the GPU (else it is ignored with a warning and
re-tuned), a cache that cannot be read or written costs a warning, never the attention call, and
concurrent writers merge under a file lock instead of overwriting each other's winners.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flash._version import __version__
from flash.heuristics import KernelConfig, Pass, arch_of, dtype_name, head_dim_bucket, smem
from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.backend import Backend

CACHE_FORMAT = 2
#: Winners read from (or written to) disk in this process, by cache file; ``None`` marks a rejected entry.
_memory: dict[Path, dict[str, KernelConfig | None]] = {}
#: Problem classes this process already tuned (or tried to): never measured twice.
_attempted: set[tuple[Path, str]] = set()


def forget() -> None:
    """Forget what this process read or tuned (the next lookup reads the cache file again)."""
    _memory.clear()
    _attempted.clear()


def enabled() -> bool:
    """Whether autotuning is on (``FLASH_AUTOTUNE=1``)."""
    return os.environ.get("FLASH_AUTOTUNE", "") == "1"


def cache_path() -> Path:
    """Where the winners are stored."""
    root = os.environ.get("FLASH_CACHE_DIR")
    if root:
        return Path(root) / "autotune.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "flash" / "autotune.json"


def _pow2_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def problem_class(spec: AttentionSpec, pass_: Pass) -> str:
    """The problem class a winner is valid for."""
    parts = [
        dtype_name(spec.dtype),
        f"d{head_dim_bucket(spec.head_dim)}",
        "causal" if spec.causal else "full",
        f"sq{_pow2_bucket(spec.seqlen_q)}",
        f"sk{_pow2_bucket(spec.seqlen_k)}",
        pass_,
    ]
    return "/".join(parts)


def device_name(device: torch.device) -> str:
    """The GPU's name (``cpu`` for the CPU), part of every key."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions(backend: Backend) -> str:
    """The library versions a winner was measured with, part of every key."""
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"flash-core {__version__}"]
    parts.append(f"{backend.name} {backend.version}")
    runtime = backend.runtime_versions()
    if runtime:
        parts.append(runtime)
    return "; ".join(parts)


def _key(backend: Backend, spec: AttentionSpec, pass_: Pass) -> str:
    return " | ".join([device_name(spec.device), versions(backend), backend.name, problem_class(spec, pass_)])


def _read(path: Path) -> dict[str, Any]:
    """The stored winners, or none if the file is missing, unreadable or of another format."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"flash autotune: ignoring unreadable cache {path}: {error}", RuntimeWarning, stacklevel=4)
        return {}
    if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT:
        return {}
    winners = stored.get("winners")
    return winners if isinstance(winners, dict) else {}


def _validated(backend: Backend, spec: AttentionSpec, pass_: Pass, row: object) -> KernelConfig | None:
    """The configuration of a stored winner if it is one this GPU can run, else None (with a warning)."""
    try:
        if not isinstance(row, dict):
            raise ValueError(f"expected an object, got {type(row).__name__}")
        config = KernelConfig.from_json(row.get("config"))
        elem = torch.empty((), dtype=spec.dtype).element_size()
        problem = smem.problem(backend, config, arch_of(spec.device), spec.head_dim, elem, pass_)
        if problem:
            raise ValueError(problem)
    except (ValueError, TypeError) as error:
        warnings.warn(
            f"flash autotune: ignoring a bad cached winner ({error}); re-tuning", RuntimeWarning, stacklevel=4
        )
        return None
    return config


def cached_winner(backend: Backend, spec: AttentionSpec, pass_: Pass) -> KernelConfig | None:
    """The cached winner for ``spec``, or None (also when autotuning is off)."""
    if not enabled():
        return None
    path = cache_path()
    known = _memory.setdefault(path, {})
    key = _key(backend, spec, pass_)
    if key not in known:
        row = _read(path).get(key)
        known[key] = None if row is None else _validated(backend, spec, pass_, row)
    return known[key]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (no lock where the platform has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # Windows: writes are still atomic, a concurrent winner may be lost
        yield
        return
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store(path: Path, key: str, row: dict[str, Any]) -> None:
    """Merge one winner into the file under the lock, atomically; warn (never raise) if it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            winners = _read(path)
            winners[key] = row
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump({"format": CACHE_FORMAT, "winners": winners}, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as error:
        warnings.warn(f"flash autotune: cannot write the cache {path}: {error}", RuntimeWarning, stacklevel=4)


def tune(
    backend: Backend,
    spec: AttentionSpec,
    pass_: Pass,
    candidates: list[KernelConfig],
    run: Callable[[KernelConfig], None],
    *,
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> KernelConfig | None:
    """Time ``run(config)`` for each candidate that fits the GPU; cache and return the fastest.

    Candidates that do not fit in shared memory or that raise are skipped and recorded as such;
    None if none ran (the caller keeps the table's configuration).
    """
    from flash.timing import measure

    elem = torch.empty((), dtype=spec.dtype).element_size()
    timings: dict[str, float | str] = {}
    best: tuple[float, KernelConfig] | None = None
    for config in candidates:
        label = json.dumps(config.to_json(), sort_keys=True)
        problem = smem.problem(backend, config, arch_of(spec.device), spec.head_dim, elem, pass_)
        if problem:
            timings[label] = problem
            continue
        try:
            ms = (timer or (lambda fn: measure(fn, device=spec.device)))(lambda: run(config))
        except Exception as error:  # a candidate the compiler rejects is not a winner
            timings[label] = f"failed: {type(error).__name__}: {error}"
            continue
        timings[label] = ms
        if best is None or ms < best[0]:
            best = (ms, config)
    if best is None:
        warnings.warn(f"flash autotune: no candidate ran for {problem_class(spec, pass_)}: {timings}", stacklevel=3)
        return None
    path, key = cache_path(), _key(backend, spec, pass_)
    row = {
        "config": best[1].to_json(),
        "milliseconds": best[0],
        "candidates": timings,
        "date": date.today().isoformat(),
    }
    _memory.setdefault(path, {})[key] = best[1]
    _store(path, key, row)
    return best[1]


def ensure_tuned(backend: Backend, spec: AttentionSpec, pass_: Pass, run: Callable[[KernelConfig], None]) -> None:
    """Measure ``backend``'s :meth:`~flash.backend.Backend.tuning_candidates` for ``spec``'s problem
    class unless a winner is cached; ``run(config)`` runs the pass with that configuration."""
    attempt = (cache_path(), _key(backend, spec, pass_))
    if attempt in _attempted or cached_winner(backend, spec, pass_) is not None:
        return
    _attempted.add(attempt)
    candidates = backend.tuning_candidates(spec, pass_)
    if candidates:
        tune(backend, spec, pass_, candidates, run)
