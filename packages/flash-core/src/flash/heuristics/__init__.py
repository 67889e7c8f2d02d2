"""Kernel configurations per GPU: block sizes, warps and pipeline stages.

Each backend owns its table (:meth:`flash.backend.Backend.heuristics_rows`, usually a JSON file
in the backend's package) keyed by GPU architecture, dtype, head-dim bucket, causal and pass;
core owns the machinery: parsing, validation (shape, ranges and the shared-memory budget of
:mod:`flash.heuristics.smem`), lookup with fallbacks to similar hardware, and the autotune cache
(:mod:`flash.heuristics.autotune`). Every entry records where it came from: measured (GPU, date,
versions) or published/unmeasured.
"""

from __future__ import annotations

import functools
import json
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
ELEMENT_BYTES = {"fp8": 1, "fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
_DTYPE_FALLBACKS = {"bf16": ("fp16",), "fp16": ("bf16",), "fp8": ("bf16", "fp16"), "fp64": ("fp32",)}
#: Tile sides a configuration may name (a kernel tile is at most this many rows or keys).
MAX_BLOCK = 4096
_SIZES = ("block_m", "block_n", "num_warps", "num_stages")


@dataclass(frozen=True)
class KernelConfig:
    """One kernel configuration. ``extra`` holds backend-specific knobs as sorted (name, value) pairs."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        limits = {"block_m": MAX_BLOCK, "block_n": MAX_BLOCK, "num_warps": 32, "num_stages": 16}
        for name in _SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits[name]:
                raise ValueError(f"kernel configuration: {name} must be an int in [1, {limits[name]}], got {value!r}")
        for name, value in self.extra:
            if not isinstance(name, str) or not isinstance(value, (bool, int, float, str)):
                raise ValueError(f"kernel configuration: knob {name!r} must be a bool, int, float or str")

    def option(self, name: str, default: Any = None) -> Any:
        """A backend-specific knob of this configuration."""
        return dict(self.extra).get(name, default)

    def to_json(self) -> dict[str, Any]:
        """The configuration as the table and the autotune cache store it."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _SIZES}
        data.update(dict(self.extra))
        return data

    @classmethod
    def from_json(cls, data: object) -> KernelConfig:
        """Parse a stored configuration; :class:`ValueError` says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError(f"kernel configuration: expected an object, got {type(data).__name__}")
        if "block_m" not in data or "block_n" not in data:
            raise ValueError("kernel configuration: block_m and block_n are required")
        extra = tuple(sorted((k, v) for k, v in data.items() if k not in _SIZES))
        return cls(
            block_m=data["block_m"],
            block_n=data["block_n"],
            num_warps=data.get("num_warps", 4),
            num_stages=data.get("num_stages", 2),
            extra=extra,
        )


#: What a backend without a table of its own (:meth:`~flash.backend.Backend.heuristics_rows`) receives.
UNTABLED = KernelConfig(64, 64)


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


def rows_from_json(package: str, filename: str) -> list[dict[str, Any]]:
    """The ``entries`` of a backend's table file shipped as package data (``package/filename``)."""
    return list(json.loads(resources.files(package).joinpath(filename).read_text())["entries"])


def parse_table(rows: list[dict[str, Any]], backend: Backend | None = None) -> dict[ConfigKey, Entry]:
    """Expand table rows (``dtype``, ``head_dim`` and ``causal`` may be lists) into validated entries.

    With ``backend``, rows name that backend (or none) and every configuration must fit the
    shared memory of its architecture as the backend lays tiles out; a bad row raises ValueError.
    """
    from flash.heuristics import smem

    table: dict[ConfigKey, Entry] = {}
    for row in rows:
        name = row.get("backend", backend.name if backend else None)
        if not isinstance(name, str) or (backend is not None and name != backend.name):
            owner = backend.name if backend is not None else "a backend"
            raise ValueError(f"heuristics table of {owner!r}: a row names backend {name!r}")
        provenance = Provenance(**row["provenance"])
        config = KernelConfig.from_json(row["config"])
        for dtype in _as_list(row["dtype"]):
            for head_dim in _as_list(row["head_dim"]):
                for causal in _as_list(row["causal"]):
                    key = ConfigKey(name, row["arch"], dtype, head_dim, causal, row["pass"])
                    if key in table:
                        raise ValueError(f"heuristics table: duplicate entry for {key}")
                    if backend is not None:
                        problem = smem.problem(backend, config, key.arch, head_dim, ELEMENT_BYTES[dtype], key.pass_)
                        if problem:
                            raise ValueError(f"heuristics table: {key}: {problem}")
                    table[key] = Entry(key, config, provenance)
    return table


_tables: dict[tuple[str, int], dict[ConfigKey, Entry]] = {}


def table_of(backend: Backend) -> dict[ConfigKey, Entry]:
    """``backend``'s validated table (parsed once per backend object)."""
    key = (backend.name, id(backend))
    found = _tables.get(key)
    if found is None:
        found = _tables[key] = parse_table(backend.heuristics_rows(), backend)
    return found


def installed_tables() -> dict[str, dict[ConfigKey, Entry]]:
    """The table of every installed backend that loads, by backend name (what the docs show)."""
    from flash.errors import BackendError
    from flash.registry import REGISTRY

    tables = {}
    for name in REGISTRY.names():
        try:
            tables[name] = table_of(REGISTRY.get(name))
        except BackendError:
            continue
    return tables


def lookup(backend: Backend, arch: str, dtype: str, head_dim: int, causal: bool, pass_: Pass) -> Entry:
    """The best table entry for a problem class, falling back to similar architectures and dtypes."""
    entries = table_of(backend)
    bucket = head_dim_bucket(head_dim)
    for a in (arch, *ARCH_FALLBACKS.get(arch, ("sm_90", "sm_80")), "any"):
        for d in (dtype, *_DTYPE_FALLBACKS.get(dtype, ())):
            for c in (causal, not causal):
                entry = entries.get(ConfigKey(backend.name, a, d, bucket, c, pass_))
                if entry is not None:
                    return entry
    raise LookupError(
        f"no kernel configuration for backend {backend.name!r}, {arch}, {dtype}, head_dim {head_dim}, "
        f"{'causal' if causal else 'non-causal'}, {pass_}"
    )


def config_for(backend: Backend, spec: AttentionSpec, pass_: Pass) -> KernelConfig:
    """The configuration ``backend`` runs ``spec`` with: the autotuned winner if autotuning is on
    (``FLASH_AUTOTUNE=1``) and one is cached for this GPU and these versions, else the table's entry."""
    from flash.heuristics import autotune

    tuned = autotune.cached_winner(backend, spec, pass_)
    if tuned is not None:
        return tuned
    if not table_of(backend):
        return UNTABLED
    arch = arch_of(spec.device)
    return lookup(backend, arch, dtype_name(spec.dtype), spec.head_dim, spec.causal, pass_).config
