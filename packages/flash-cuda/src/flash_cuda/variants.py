"""Kernel variants: template parameters, NVRTC options and the rendered source.

A :class:`Variant` is everything that changes the compiled kernel: head dim as compiled, block
shape, warps, pipeline depth, Q in registers or not, dtype, the kind of mask, and the target
architecture. It renders itself into NVRTC options (``-D`` defines plus ``-arch``); the source
is the same text for every variant (``kernels/flash_fwd.cu`` with its includes inlined), so
the pair (source, options) is a complete cache key, which is what CuPy's disk cache hashes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from flash.heuristics import KernelConfig, smem
from flash_cuda.sources import inline_includes

KERNEL_NAME = "flash_fwd_kernel"
ENTRY_FILE = "flash_fwd.cu"
#: Options every compile gets (CuPy adds -ftz=true itself; the CPU tier adds it explicitly).
BASE_OPTIONS = ("-std=c++17",)
#: Head dims the compiled kernel is instantiated for; others round up to the next multiple of 16.
SHIPPED_HEAD_DIMS = (32, 64, 96, 128, 256)
#: Kinds of mask a variant is compiled for.
MASK_NONE, MASK_RIGHT, MASK_BOTH = 0, 1, 2
MASK_NAMES = {MASK_NONE: "full", MASK_RIGHT: "causal", MASK_BOTH: "window"}
#: Largest dynamic shared memory one block may opt in to, bytes (CUDA programming guide).
MAX_SMEM_OPTIN = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}


@dataclass(frozen=True)
class Variant:
    head_dim: int  # as compiled: a multiple of 16 >= the problem's head dim
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    q_in_regs: bool
    min_blocks: int
    bf16: bool
    mask: int  # MASK_NONE, MASK_RIGHT (causal, or a window open to the left) or MASK_BOTH
    arch: str  # NVRTC target, e.g. "sm_90a" or "sm_80"

    def __post_init__(self) -> None:
        if isinstance(self.mask, bool) or not isinstance(self.mask, int):
            raise ValueError(f"invalid CUDA kernel variant: mask {self.mask!r} is not an int {sorted(MASK_NAMES)}")
        problems = []
        if self.head_dim % 16 or not 16 <= self.head_dim <= 256:
            problems.append(f"head_dim {self.head_dim} is not a multiple of 16 in [16, 256]")
        if self.block_m % (16 * self.num_warps):
            problems.append(f"block_m {self.block_m} is not a multiple of 16 * num_warps ({16 * self.num_warps})")
        if self.block_n % 16 or self.block_n <= 0:
            problems.append(f"block_n {self.block_n} is not a positive multiple of 16")
        if self.num_stages < 2:
            problems.append(f"num_stages {self.num_stages} < 2")
        if self.mask not in MASK_NAMES:
            problems.append(f"mask {self.mask} is not one of {sorted(MASK_NAMES)}")
        if problems:
            raise ValueError("invalid CUDA kernel variant: " + "; ".join(problems))

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one block: Q tile plus num_stages (K, V) tiles, rows padded by 16 B."""
        config = KernelConfig(self.block_m, self.block_n, self.num_warps, self.num_stages)
        return smem.shared_memory_bytes(config, smem_row(self.head_dim), 2, "forward")

    def defines(self) -> tuple[str, ...]:
        values = {
            "FLASH_D": self.head_dim,
            "FLASH_BM": self.block_m,
            "FLASH_BN": self.block_n,
            "FLASH_NW": self.num_warps,
            "FLASH_STAGES": self.num_stages,
            "FLASH_QREG": int(self.q_in_regs),
            "FLASH_MIN_BLOCKS": self.min_blocks,
            "FLASH_BF16": int(self.bf16),
            "FLASH_MASK": self.mask,
        }
        return tuple(f"-D{name}={value}" for name, value in values.items())

    def options(self, arch: bool = True) -> tuple[str, ...]:
        """NVRTC options; ``arch=False`` leaves the target to the caller (CuPy picks the device's)."""
        return BASE_OPTIONS + ((f"-arch={self.arch}",) if arch else ()) + self.defines()

    def label(self) -> str:
        q_where = "qreg" if self.q_in_regs else "qsmem"
        return (
            f"{'bf16' if self.bf16 else 'fp16'} d{self.head_dim} {MASK_NAMES[self.mask]} "
            f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} "
            f"{q_where} "
            f"mb{self.min_blocks} {self.arch}"
        )


def mask_kind(bounds: tuple[int, int], masked: bool) -> int:
    """The mask a problem needs, from its ``(left, right)`` reach (``spec.mask_bounds``; -1 unbounded)."""
    if not masked:
        return MASK_NONE
    return MASK_RIGHT if bounds[0] < 0 else MASK_BOTH


def compiled_head_dim(head_dim: int) -> int:
    """The head dim a kernel is compiled for: the next multiple of 16."""
    return max(16, -(-head_dim // 16) * 16)


def smem_row(head_dim: int) -> int:
    """Elements of one tile row in shared memory: the compiled head dim plus 8 (16 bytes against bank conflicts)."""
    return compiled_head_dim(head_dim) + 8


def nvrtc_arch(capability: tuple[int, int]) -> str:
    """NVRTC target for a compute capability: sm_90a on Hopper, sm_XY elsewhere."""
    major, minor = capability
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def table_arch(arch: str) -> str:
    """The heuristics-table architecture of an NVRTC target ("sm_90a" -> "sm_90")."""
    return arch[:-1] if arch.endswith("a") else arch


def max_smem(arch: str) -> int:
    return MAX_SMEM_OPTIN.get(table_arch(arch), MAX_SMEM_OPTIN["sm_86"])


def make_variant(
    config: KernelConfig, head_dim: int, bf16: bool, mask: int, arch: str, smem_limit: int | None = None
) -> Variant:
    """The variant for a table configuration and problem, shrunk if it would not fit in ``smem_limit``.

    Extra config keys: ``q_in_regs`` (default: head dim <= 128), ``min_blocks`` (default 1) and
    ``block_n_window`` (block_n of windowed problems, whose two-sided mask needs more registers;
    default block_n).
    """
    d = compiled_head_dim(head_dim)
    block_n = int(config.option("block_n_window", config.block_n)) if mask == MASK_BOTH else config.block_n
    variant = Variant(
        head_dim=d,
        block_m=config.block_m,
        block_n=block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        q_in_regs=bool(config.option("q_in_regs", d <= 128)),
        min_blocks=int(config.option("min_blocks", 1)),
        bf16=bf16,
        mask=mask,
        arch=arch,
    )
    limit = max_smem(arch) if smem_limit is None else smem_limit
    return shrink_to_fit(variant, limit)


def shrink_to_fit(variant: Variant, limit: int) -> Variant:
    """Fewer stages, narrower key blocks, fewer query rows, until shared memory fits."""
    from dataclasses import replace

    while variant.smem_bytes > limit:
        if variant.num_stages > 2:
            variant = replace(variant, num_stages=variant.num_stages - 1)
        elif variant.block_n > 32:
            variant = replace(variant, block_n=variant.block_n // 2)
        elif variant.block_m > 16 * variant.num_warps:
            variant = replace(variant, block_m=variant.block_m // 2)
        elif variant.num_warps > 1:
            variant = replace(variant, num_warps=variant.num_warps // 2, block_m=variant.block_m // 2)
        else:
            raise ValueError(f"no CUDA kernel variant fits in {limit} bytes of shared memory: {variant.label()}")
    return variant


@functools.lru_cache(maxsize=1)
def source() -> str:
    """The kernel source with every ``#include "..."`` of the kernels folder inlined (once each)."""
    return inline_includes(ENTRY_FILE)
