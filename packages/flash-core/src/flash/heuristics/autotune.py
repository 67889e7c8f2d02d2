"""Autotuning: measure candidate configurations, cache the winners on disk as JSON.

Off unless ``FLASH_AUTOTUNE=1``. Then the first call of each problem class times the
candidates the backend proposes (:meth:`flash.backend.Backend.tuning_candidates`) and
every later call, in this process or another, uses the winner. A winner is keyed by the GPU's name, the
library versions (torch, flash-core, the backend) and the problem class (dtype,
head-dim bucket, causal, sequence-length buckets, pass), so a driver or library
upgrade re-tunes instead of trusting stale numbers. The cache lives in
``$FLASH_CACHE_DIR`` (default ``~/.cache/flash``) as ``autotune.json``; it is
plain JSON, never pickle, so reading it cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flash import timing
from flash._version import __version__
from flash.heuristics import KernelConfig, Pass, arch_of, dtype_name, head_dim_bucket, override
from flash.heuristics.smem import budget
from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.backend import Backend

CACHE_FORMAT = 1
_loaded: dict[Path, dict[str, Any]] = {}


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
    bucket = 1
    while bucket < n:
        bucket *= 2
    return bucket


def problem_class(spec: AttentionSpec, pass_: Pass) -> str:
    """The problem class a winner is valid for."""
    return "/".join(
        [
            dtype_name(spec.dtype),
            f"d{head_dim_bucket(spec.head_dim)}",
            "causal" if spec.causal else "full",
            f"sq{_pow2_bucket(spec.seqlen_q)}",
            f"sk{_pow2_bucket(spec.seqlen_k)}",
            pass_,
        ]
    )


def device_name(device: torch.device) -> str:
    """The GPU's name (``cpu`` for the CPU), part of every key."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions(backend: Backend) -> str:
    """The library versions a winner was measured with, part of every key."""
    return f"torch {torch.__version__}; flash-core {__version__}; {backend.name} {backend.version}"


def _key(backend: Backend, spec: AttentionSpec, pass_: Pass) -> str:
    return " | ".join([device_name(spec.device), versions(backend), backend.name, problem_class(spec, pass_)])


def _load(path: Path) -> dict[str, Any]:
    if path not in _loaded:
        data: dict[str, Any] = {"format": CACHE_FORMAT, "winners": {}}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                if stored.get("format") == CACHE_FORMAT:
                    data = stored
            except (OSError, ValueError):
                pass  # an unreadable cache is re-tuned, not fatal
        _loaded[path] = data
    return _loaded[path]


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=1, sort_keys=True)
    os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old or the new file


def cached_winner(backend: Backend, spec: AttentionSpec, pass_: Pass) -> KernelConfig | None:
    """The cached winner for ``spec``, or None (also when autotuning is off)."""
    if not enabled():
        return None
    row = _load(cache_path())["winners"].get(_key(backend, spec, pass_))
    return KernelConfig.from_json(row["config"]) if row else None


def tune(
    backend: Backend,
    spec: AttentionSpec,
    pass_: Pass,
    candidates: list[KernelConfig],
    run: Callable[[KernelConfig], None],
    *,
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> KernelConfig:
    """Time ``run(config)`` for each candidate that fits the GPU; cache and return the fastest.

    Candidates that do not fit in shared memory or that raise are skipped and recorded as such.
    """
    measure = timer or (lambda fn: timing.measure(fn, device=spec.device))
    arch = arch_of(spec.device)
    elem = torch.empty((), dtype=spec.dtype).element_size()
    timings: dict[str, float | str] = {}
    best: tuple[float, KernelConfig] | None = None
    for config in candidates:
        label = json.dumps(config.to_json(), sort_keys=True)
        if not budget(config, arch, spec.head_dim, elem, pass_).fits:
            timings[label] = "does not fit in shared memory"
            continue
        try:
            ms = measure(lambda: run(config))
        except Exception as error:  # a candidate the compiler rejects is not a winner
            timings[label] = f"failed: {type(error).__name__}: {error}"
            continue
        timings[label] = ms
        if best is None or ms < best[0]:
            best = (ms, config)
    if best is None:
        raise RuntimeError(f"autotune: no candidate ran for {problem_class(spec, pass_)}: {timings}")
    path = cache_path()
    data = _load(path)
    data["winners"][_key(backend, spec, pass_)] = {
        "config": best[1].to_json(),
        "milliseconds": best[0],
        "candidates": timings,
        "date": date.today().isoformat(),
    }
    _save(path, data)
    return best[1]


def ensure_tuned(backend: Backend, spec: AttentionSpec, pass_: Pass, run: Callable[[], None]) -> None:
    """Measure ``backend``'s :meth:`~flash.backend.Backend.tuning_candidates` for ``spec``'s problem
    class unless a winner is cached; ``run()`` runs the pass with whatever :func:`config_for` says."""
    if cached_winner(backend, spec, pass_) is not None:
        return
    candidates = backend.tuning_candidates(spec, pass_)
    if not candidates:
        return

    def run_with(config: KernelConfig) -> None:
        with override(config):
            run()

    tune(backend, spec, pass_, candidates, run_with)
