"""Kernel configurations per GPU: block sizes, warps and pipeline stages.

Backends read their tile shapes from one table (``tables/<backend>.json``
beside this file) keyed by backend, GPU architecture, dtype, head-dim bucket, causal and
pass. Every entry records where it came from: measured (GPU, date, versions) or
published/unmeasured. :mod:`flash.heuristics.smem` rejects entries that cannot
fit in the shared memory of their GPU, and :mod:`flash.heuristics.autotune`
measures candidates and caches winners on disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import torch

from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.backend import Backend

Pass = Literal["forward", "backward"]
HEAD_DIM_BUCKETS = (32, 64, 128, 256)
#: Where to look when an architecture has no entry of its own, most similar first;
#: ``"any"`` (device-independent entries, e.g. the reference backend's) comes last.
ARCH_FALLBACKS: dict[str, tuple[str, ...]] = {
    "sm_80": (),
    "sm_86": ("sm_80",),
    "sm_89": ("sm_86", "sm_80"),
    "sm_90": ("sm_80",),
    "cpu": (),
}
_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e5m2: "fp8",
}
_DTYPE_FALLBACKS = {"bf16": ("fp16",), "fp16": ("bf16",), "fp8": ("bf16", "fp16"), "fp64": ("fp32",)}


@dataclass(frozen=True)
class KernelConfig:
    """One kernel configuration. ``extra`` holds backend-specific knobs as sorted (name, value) pairs."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    extra: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        """A backend-specific knob of this configuration."""
        return dict(self.extra).get(name, default)

    def to_json(self) -> dict[str, Any]:
        """The configuration as the table and the autotune cache store it."""
        data: dict[str, Any] = {
            "block_m": self.block_m,
            "block_n": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }
        data.update(dict(self.extra))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelConfig:
        known = {"block_m", "block_n", "num_warps", "num_stages"}
        extra = tuple(sorted((k, v) for k, v in data.items() if k not in known))
        return cls(
            block_m=int(data["block_m"]),
            block_n=int(data["block_n"]),
            num_warps=int(data.get("num_warps", 4)),
            num_stages=int(data.get("num_stages", 2)),
            extra=extra,
        )


@dataclass(frozen=True)
class Provenance:
    """Where a configuration came from."""

    kind: Literal["measured", "published", "unmeasured"]
    note: str
    gpu: str | None = None
    date: str | None = None
    versions: str | None = None

    def __str__(self) -> str:
        if self.kind == "measured":
            return f"measured on {self.gpu}, {self.date} ({self.versions}): {self.note}"
        return f"{self.kind}: {self.note}"


@dataclass(frozen=True)
class ConfigKey:
    backend: str
    arch: str
    dtype: str
    head_dim: int  # bucket upper bound
    causal: bool
    pass_: Pass


@dataclass(frozen=True)
class Entry:
    key: ConfigKey
    config: KernelConfig
    provenance: Provenance = field(compare=False)


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name for ``dtype``: fp16, bf16, fp8, fp32 or fp64."""
    return _DTYPE_NAMES[dtype]


def head_dim_bucket(head_dim: int) -> int:
    """The table's head-dim key: the smallest of 32, 64, 128, 256 that holds ``head_dim``."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} is above the largest bucket {HEAD_DIM_BUCKETS[-1]}")


@functools.cache
def arch_of(device: torch.device) -> str:
    """``"sm_90"`` for an H100, ``"cpu"`` for the CPU."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def parse_table(rows: list[dict[str, Any]]) -> dict[ConfigKey, Entry]:
    """Expand table rows (``dtype``, ``head_dim`` and ``causal`` may be lists) into entries."""
    table: dict[ConfigKey, Entry] = {}
    for row in rows:
        provenance = Provenance(**row["provenance"])
        config = KernelConfig.from_json(row["config"])
        for dtype in _as_list(row["dtype"]):
            for head_dim in _as_list(row["head_dim"]):
                for causal in _as_list(row["causal"]):
                    key = ConfigKey(row["backend"], row["arch"], dtype, head_dim, causal, row["pass"])
                    if key in table:
                        raise ValueError(f"heuristics table: duplicate entry for {key}")
                    table[key] = Entry(key, config, provenance)
    return table


_extra_rows: list[dict[str, Any]] = []


@functools.lru_cache(maxsize=1)
def table() -> dict[ConfigKey, Entry]:
    """The configuration table: every ``tables/*.json`` file beside this module (one per backend),
    plus the rows third-party backends added with :func:`add_rows`."""
    rows: list[dict[str, Any]] = []
    for item in sorted(resources.files("flash.heuristics").joinpath("tables").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            rows += json.loads(item.read_text())["entries"]
    return parse_table(rows + _extra_rows)


def add_rows(rows: list[dict[str, Any]]) -> None:
    """Add table rows (same format as ``tables/*.json``) for a backend that ships outside flash-core."""
    parse_table(rows)  # reject malformed rows before they reach the shared table
    _extra_rows.extend(rows)
    table.cache_clear()
    _config_for_class.cache_clear()


def lookup(backend: str, arch: str, dtype: str, head_dim: int, causal: bool, pass_: Pass) -> Entry:
    """The best table entry for a problem class, falling back to similar architectures and dtypes."""
    entries = table()
    bucket = head_dim_bucket(head_dim)
    for a in (arch, *ARCH_FALLBACKS.get(arch, ("sm_90", "sm_80")), "any"):
        for d in (dtype, *_DTYPE_FALLBACKS.get(dtype, ())):
            for c in (causal, not causal):
                entry = entries.get(ConfigKey(backend, a, d, bucket, c, pass_))
                if entry is not None:
                    return entry
    raise LookupError(
        f"no kernel configuration for backend {backend!r}, {arch}, {dtype}, head_dim {head_dim}, "
        f"{'causal' if causal else 'non-causal'}, {pass_}"
    )


@functools.lru_cache(maxsize=4096)
def _config_for_class(backend: str, arch: str, dtype: str, head_dim: int, causal: bool, pass_: Pass) -> KernelConfig:
    return lookup(backend, arch, dtype, head_dim, causal, pass_).config


_override: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar("flash_config", default=None)


@contextlib.contextmanager
def override(config: KernelConfig) -> Iterator[None]:
    """Make :func:`config_for` answer ``config`` inside the block (how autotuning tries a candidate)."""
    token = _override.set(config)
    try:
        yield
    finally:
        _override.reset(token)


def config_for(backend: Backend, spec: AttentionSpec, pass_: Pass) -> KernelConfig:
    """The configuration ``backend`` should use for ``spec``: a candidate being measured, else the
    autotuned winner if autotuning is on (``FLASH_AUTOTUNE=1``) and one is cached for this GPU and
    these versions, else the table's entry."""
    from flash.heuristics import autotune

    trying = _override.get()
    if trying is not None:
        return trying
    tuned = autotune.cached_winner(backend, spec, pass_)
    if tuned is not None:
        return tuned
    arch = arch_of(spec.device)
    return _config_for_class(backend.name, arch, dtype_name(spec.dtype), spec.head_dim, spec.causal, pass_)
