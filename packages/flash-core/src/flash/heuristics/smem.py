"""Shared-memory budget of a tile configuration.

FlashAttention's block sizes are bounded by on-chip memory. The seeds' argument:
a thread block holds a Q tile (B_r x d), K and V tiles (B_c x d each) and an
output tile (B_r x d), so with M elements of SRAM, B_c = floor(M / 4d) and
B_r = min(B_c, d). Real kernels keep O in registers and pipeline K/V through
``num_stages`` buffers, so the estimate here counts what sits in shared memory:
the Q tile plus ``num_stages`` K/V tile pairs (forward), or the K/V tiles plus
``num_stages`` Q/dO tile pairs and one score tile (backward).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flash.heuristics import KernelConfig, Pass

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


def padded_head_dim(head_dim: int) -> int:
    """Kernels tile the head dimension in powers of two (at least 16)."""
    d = 16
    while d < head_dim:
        d *= 2
    return d


def shared_memory_bytes(config: KernelConfig, head_dim: int, elem_bytes: int, pass_: Pass) -> int:
    """Bytes of shared memory the tiles of ``config`` occupy (see the module docstring).

    A backward that computes dQ in a kernel of its own declares that kernel's tiles as
    ``dq_block_m``, ``dq_block_n``, ``dq_num_stages``: the larger of the two kernels counts.
    """
    d = padded_head_dim(head_dim)
    if pass_ == "forward":
        elements = config.block_m * d + config.num_stages * 2 * config.block_n * d
        return elements * elem_bytes
    # dK/dV kernel: K and V stay, Q and dO stream in, one score tile is staged.
    elements = 2 * config.block_n * d + config.num_stages * 2 * config.block_m * d + config.block_m * config.block_n
    if config.option("dq_block_m") is not None:
        # dQ kernel: Q and dO stay, K and V stream in.
        dq_m, dq_n = config.option("dq_block_m"), config.option("dq_block_n", config.block_n)
        dq_stages = config.option("dq_num_stages", config.num_stages)
        elements = max(elements, 2 * dq_m * d + dq_stages * 2 * dq_n * d + dq_m * dq_n)
    return elements * elem_bytes


def budget(config: KernelConfig, arch: str, head_dim: int, elem_bytes: int, pass_: Pass) -> Budget:
    """How much shared memory the configuration needs, against what ``arch`` offers a block."""
    if arch == "cpu":  # tiles live in ordinary memory: no budget
        return Budget(shared_memory_bytes(config, head_dim, elem_bytes, pass_), sys.maxsize)
    available = MAX_SMEM_PER_BLOCK.get(arch, MAX_SMEM_PER_BLOCK["sm_80"])
    return Budget(shared_memory_bytes(config, head_dim, elem_bytes, pass_), available)


def seed_block_columns(smem_bytes: int, head_dim: int, elem_bytes: int) -> int:
    """The seeds' rule of thumb B_c = floor(M / 4d), with M counted in elements."""
    return smem_bytes // elem_bytes // (4 * head_dim)
