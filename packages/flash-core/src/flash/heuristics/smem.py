"""Shared-memory budget of a tile configuration: the one model every backend and check uses.

FlashAttention's block sizes are bounded by on-chip memory. The seeds' argument:
a thread block holds a Q tile (B_r x d), K and V tiles (B_c x d each) and an
output tile (B_r x d), so with M elements of SRAM, B_c = floor(M / 4d) and
B_r = min(B_c, d). Real kernels keep O in registers and pipeline K/V through
``num_stages`` buffers, so the estimate here counts what sits in shared memory:
the Q tile plus ``num_stages`` K/V tile pairs (forward), or the K/V tiles plus
``num_stages`` Q/dO tile pairs and one score tile (backward). A tile row takes
:meth:`flash.backend.Backend.shared_memory_row` elements (the head dim as the backend stores
it: padded to a power of two, or with a few elements of padding against bank conflicts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flash.heuristics import KernelConfig, Pass

if TYPE_CHECKING:
    from flash.backend import Backend

#: Largest shared memory one thread block may use after opting in, in bytes (CUDA programming guide).
MAX_SMEM_PER_BLOCK = {
    "sm_80": 163 * 1024,  # A100
    "sm_86": 99 * 1024,  # RTX 30xx, A10, A40
    "sm_89": 99 * 1024,  # RTX 40xx, L4, L40
    "sm_90": 227 * 1024,  # H100, H200
}


@dataclass(frozen=True)
class Budget:
    needed: int
    available: int

    @property
    def fits(self) -> bool:
        """True when the tiles fit in what the GPU offers one block."""
        return self.needed <= self.available


def shared_memory_bytes(config: KernelConfig, row: int, elem_bytes: int, pass_: Pass) -> int:
    """Bytes of shared memory the tiles of ``config`` occupy with rows of ``row`` elements.

    A backward that computes dQ in a kernel of its own declares that kernel's tiles as
    ``dq_block_m``, ``dq_block_n``, ``dq_num_stages``: the larger of the two kernels counts.
    """
    if pass_ == "forward":
        elements = config.block_m * row + config.num_stages * 2 * config.block_n * row
        return elements * elem_bytes
    # dK/dV kernel: K and V stay, Q and dO stream in, one score tile is staged.
    elements = 2 * config.block_n * row + config.num_stages * 2 * config.block_m * row + config.block_m * config.block_n
    if config.option("dq_block_m") is not None:
        # dQ kernel: Q and dO stay, K and V stream in.
        dq_m, dq_n = config.option("dq_block_m"), config.option("dq_block_n", config.block_n)
        dq_stages = config.option("dq_num_stages", config.num_stages)
        elements = max(elements, 2 * dq_m * row + dq_stages * 2 * dq_n * row + dq_m * dq_n)
    return elements * elem_bytes


def budget(config: KernelConfig, arch: str, row: int, elem_bytes: int, pass_: Pass) -> Budget:
    """How much shared memory the configuration needs, against what ``arch`` offers a block."""
    needed = shared_memory_bytes(config, row, elem_bytes, pass_)
    if arch in ("cpu", "any"):  # tiles live in ordinary memory: no budget
        return Budget(needed, sys.maxsize)
    return Budget(needed, MAX_SMEM_PER_BLOCK.get(arch, MAX_SMEM_PER_BLOCK["sm_80"]))


def problem(backend: Backend, config: KernelConfig, arch: str, head_dim: int, elem_bytes: int, pass_: Pass) -> str:
    """Why ``config`` cannot run on ``arch`` for ``backend`` ('' when its tiles fit)."""
    b = budget(config, arch, backend.shared_memory_row(head_dim), elem_bytes, pass_)
    if b.fits:
        return ""
    return f"does not fit: tiles need {b.needed} bytes of shared memory, {arch} offers a block {b.available}"


def seed_block_columns(smem_bytes: int, head_dim: int, elem_bytes: int) -> int:
    """The seeds' rule of thumb B_c = floor(M / 4d), with M counted in elements."""
    return smem_bytes // elem_bytes // (4 * head_dim)
