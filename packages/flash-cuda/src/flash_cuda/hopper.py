"""Hopper (sm_90a) FlashAttention forward: tile table, kernel variants, source, compile and launch.

The kernel (``kernels/hopper_fwd.cuh``) streams Q, K and V with TMA into swizzled shared memory,
multiplies with ``wgmma`` and splits each persistent thread block into one producer and two or three
consumer warpgroups (PERF_NOTES.md, "Hopper kernel"). This module imports neither flash-core nor,
until a kernel is compiled, CuPy: it works on canonical ``(batch, seqlen, heads, head_dim)`` views.

Kernel-level API (what the backend wires in):

- :func:`config_for` -- the tile configuration of a problem class, from :data:`TABLE`;
- :func:`unsupported_reasons` -- why the kernel cannot take a problem (empty list: it can);
- :func:`forward` -- fill ``out`` and ``lse`` with one launch on torch's current stream.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from flash_cuda import modules, tensor_map
from flash_cuda.sources import inline_includes

KERNEL_NAME = "flash_fwd_sm90"
ENTRY_FILE = "hopper_fwd.cu"
#: The include that :func:`source` fills with the variant's wgmma instructions.
GENERATED_INCLUDE = "hopper_wgmma.cuh"
ARCH = "sm_90a"
BASE_OPTIONS = ("-std=c++17",)
#: Head dims a kernel is compiled for; a problem's head dim rounds up to the next (zero-filled columns).
SHIPPED_HEAD_DIMS = (64, 96, 128, 192, 256)
#: fp8 tiles are whole 64-byte swizzle rows.
FP8_HEAD_DIMS = (64, 128, 192, 256)
#: Input types, in the kernel's numbering (Shape::INPUT), and their torch names.
INPUTS = ("fp16", "bf16", "e4m3", "e5m2")
FP8_INPUTS = ("e4m3", "e5m2")
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
MASK_NONE, MASK_RIGHT, MASK_BOTH = 0, 1, 2
MASK_NAMES = {MASK_NONE: "full", MASK_RIGHT: "causal", MASK_BOTH: "window"}
#: Largest dynamic shared memory a block may opt in to on sm_90, bytes.
MAX_SMEM = 227 * 1024
#: Depth of the K and V rings (Shape::STAGES): the widest tiles fill shared memory with two, and a
#: third stage measured no faster where it fits (run 1: d128 128x128, 626 vs 633 TFLOP/s).
STAGES = 2
#: Slack for aligning the shared-memory base to the 1024-byte swizzle period inside the kernel.
SMEM_ALIGN_SLACK = 1024
#: Stand-in for an unbounded window side; sequences are capped below it.
UNBOUNDED_REACH = 1 << 30
MAX_SEQLEN = (1 << 29) - 1
MAX_TILES = 2**31 - 1
LOG2E = 1.4426950408889634


# ------------------------------------------------------------------ tiles: the table


#: Tile orders of the kernel (blocks_outer = 0, 1); a table row may also say "auto" (see tile_order).
ORDERS = ("heads", "blocks")
#: "auto" takes the "heads" order unless it would leave the persistent blocks' work this unbalanced.
BALANCE_FOR_HEADS = 0.9


@dataclass(frozen=True)
class HopperConfig:
    """Tiles and tile order of one problem class: 64 * consumers query rows per tile, block_n keys
    per block; order "heads" walks the tiles head by head (K and V shared in L2), "blocks" query
    block by query block, heaviest first (longest work first: balances causal and varlen work),
    "auto" picks per problem (:func:`tile_order`)."""

    consumers: int  # consumer warpgroups: 2 (240 registers each) or 3 (160 registers each)
    block_n: int
    order: str = "heads"
    q_stages: int = 1  # Q buffers: 2 loads the next tile's Q while this one runs (short sequences)

    @property
    def block_m(self) -> int:
        return 64 * self.consumers


@dataclass(frozen=True)
class TableRow:
    head_dim: int  # compiled head dim
    mask: int  # MASK_NONE, MASK_RIGHT or MASK_BOTH
    max_seqlen_k: int | None  # the row serves problems with seqlen_k up to this (None: any)
    config: HopperConfig
    provenance: str  # "measured: GPU, date, versions, what" or "unmeasured: why this guess"


_H200 = "measured: NVIDIA H200, 2026-12-02, torch 2.11.0+cu130, CUDA 13.0, CuPy 14.2.0, NVRTC 13.0, bf16"
_AUTO = "order auto (run 2: heads order won where its balance was 0.97, blocks won at 0.83 and 0.65)"

#: Tiles per (compiled head dim, mask kind, seqlen_k bucket); the first row that fits a problem
#: serves it. Problems of other head dims use the next shipped one. Runs 1-3: PERF_NOTES.md.
TABLE: tuple[TableRow, ...] = (
    TableRow(64, MASK_NONE, None, HopperConfig(3, 128), f"{_H200}: best of 5 tiles at 8k (run 1), of 3 at 1k (run 3)"),
    TableRow(
        64, MASK_RIGHT, 2048, HopperConfig(2, 128, "auto", 2), f"{_H200}: 299 vs 250 TFLOP/s for 192x128 at 1k (run 3)"
    ),
    TableRow(64, MASK_RIGHT, None, HopperConfig(3, 128, "auto"), f"{_H200}: best of 3 at 8k (run 2); {_AUTO}"),
    TableRow(64, MASK_BOTH, None, HopperConfig(3, 128, "auto"), "unmeasured: as causal"),
    TableRow(96, MASK_NONE, 4096, HopperConfig(2, 128, "heads", 2), "unmeasured: as d128 up to 4k"),
    TableRow(96, MASK_NONE, None, HopperConfig(2, 192), f"{_H200}: best of 3 tiles at 8k (run 2)"),
    TableRow(96, MASK_RIGHT, None, HopperConfig(2, 176, "auto"), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(96, MASK_BOTH, None, HopperConfig(2, 128, "auto"), "unmeasured: as causal, narrower"),
    TableRow(
        128, MASK_NONE, 4096, HopperConfig(2, 128, "heads", 2), f"{_H200}: +3% over 128x176 at 4k, even at 1k (run 3)"
    ),
    TableRow(128, MASK_NONE, None, HopperConfig(2, 176), f"{_H200}: best of 3-5 tiles at 8k (runs 1-3)"),
    TableRow(128, MASK_RIGHT, 4096, HopperConfig(2, 128, "auto", 2), f"{_H200}: +3% at 4k, even at 1k (run 3)"),
    TableRow(128, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), f"{_H200}: best of 4 at 8k (run 2); {_AUTO}"),
    TableRow(128, MASK_BOTH, None, HopperConfig(2, 128, "auto"), "unmeasured: as causal"),
    TableRow(192, MASK_NONE, None, HopperConfig(2, 96), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(192, MASK_RIGHT, None, HopperConfig(2, 96, "auto"), f"{_H200}: best of 2 tiles at 8k (run 2)"),
    TableRow(192, MASK_BOTH, None, HopperConfig(2, 96, "auto"), "unmeasured: as causal"),
    TableRow(256, MASK_NONE, None, HopperConfig(2, 80), f"{_H200}: best of 2 tiles at 8k (runs 1-2)"),
    TableRow(256, MASK_RIGHT, None, HopperConfig(2, 80, "auto"), f"{_H200}: best of 3 at 8k (run 2); {_AUTO}"),
    TableRow(256, MASK_BOTH, None, HopperConfig(2, 64, "auto"), "unmeasured: as causal, narrower (registers)"),
)


_FP8 = (
    "unmeasured: the bf16 tiles' shape where it fits (V^T rows of 64 or 128 keys), the only tiles tried; "
    "timed on the H200 2026-12-02 (PERF_NOTES.md), not compared with others"
)

#: fp8 inputs (e4m3, e5m2): key blocks of 64 or 128 (a V^T row is one swizzle span); more keys per
#: block than for 16 bits would not fit the V^T ring.
FP8_TABLE: tuple[TableRow, ...] = (
    TableRow(64, MASK_NONE, None, HopperConfig(2, 128), _FP8),
    TableRow(64, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(64, MASK_BOTH, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(128, MASK_NONE, None, HopperConfig(2, 128), _FP8),
    TableRow(128, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(128, MASK_BOTH, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(192, MASK_NONE, None, HopperConfig(2, 128), _FP8),
    TableRow(192, MASK_RIGHT, None, HopperConfig(2, 128, "auto"), _FP8),
    TableRow(192, MASK_BOTH, None, HopperConfig(2, 64, "auto"), _FP8),
    TableRow(256, MASK_NONE, None, HopperConfig(2, 64), _FP8),
    TableRow(256, MASK_RIGHT, None, HopperConfig(2, 64, "auto"), _FP8),
    TableRow(256, MASK_BOTH, None, HopperConfig(2, 64, "auto"), _FP8),
)


def compiled_head_dim(head_dim: int, fp8: bool = False) -> int:
    """The shipped head dim a problem runs at (the next one up; extra columns are zeros)."""
    for d in FP8_HEAD_DIMS if fp8 else SHIPPED_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim {head_dim} > {SHIPPED_HEAD_DIMS[-1]}")


def mask_kind(window: tuple[int, int]) -> int:
    """The mask a ``(left, right)`` window needs (-1: unbounded side; causal is (-1, 0))."""
    left, right = window
    if left < 0 and right < 0:
        return MASK_NONE
    return MASK_RIGHT if left < 0 else MASK_BOTH


def table_row(head_dim: int, mask: int, seqlen_k: int | None = None, fp8: bool = False) -> TableRow:
    d = compiled_head_dim(head_dim, fp8)
    for row in FP8_TABLE if fp8 else TABLE:
        fits = row.max_seqlen_k is None or (seqlen_k is not None and seqlen_k <= row.max_seqlen_k)
        if row.head_dim == d and row.mask == mask and fits:
            return row
    raise KeyError(f"no Hopper table row for head dim {d}, mask {MASK_NAMES[mask]}")


def config_for(
    head_dim: int, window: tuple[int, int] = (-1, -1), seqlen_k: int | None = None, fp8: bool = False
) -> HopperConfig:
    """The tiles for a problem class: head dim (before rounding up), ``(left, right)`` window,
    (longest) key sequence length and whether the inputs are fp8."""
    return table_row(head_dim, mask_kind(window), seqlen_k, fp8).config


def _block_costs(m_blocks: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, window: tuple) -> list[int]:
    """Key blocks each query block sees (the kernel's make_tile), plus one for its fixed costs."""
    left, right = window
    off = seqlen_k - seqlen_q
    costs = []
    for m in range(m_blocks):
        m0 = m * block_m
        rows = min(block_m, seqlen_q - m0)
        hi = seqlen_k if right < 0 else max(0, min(seqlen_k, m0 + rows - 1 + off + right + 1))
        lo = 0 if left < 0 else max(0, min(seqlen_k, m0 + off - left))
        costs.append(1 + (-(-hi // block_n) - lo // block_n if hi > lo else 0))
    return costs


@functools.lru_cache(maxsize=512)
def _heads_order_balance(
    m_blocks: int, pairs: int, grid: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, window: tuple
) -> float:
    """Mean over max of the persistent blocks' work when tiles go in "heads" order, round by round
    in alternating directions (the kernel's tile_index)."""
    import torch

    costs = torch.tensor(_block_costs(m_blocks, block_m, block_n, seqlen_q, seqlen_k, window), dtype=torch.float64)
    t = torch.arange(m_blocks * pairs)
    rounds, i = t // grid, t % grid
    owner = torch.where(rounds % 2 == 1, grid - 1 - i, i)
    load = torch.zeros(grid, dtype=torch.float64).index_add_(0, owner, costs[m_blocks - 1 - t % m_blocks])
    return float(load.mean() / load.max())


def tile_order(
    config: HopperConfig, *, m_blocks: int, pairs: int, grid: int, seqlen_q: int, seqlen_k: int, window: tuple,
    varlen: bool,
) -> str:  # fmt: skip
    """The kernel's tile order for a problem: the config's, or for "auto" the "heads" order (few heads'
    K and V in L2 at a time) unless it balances the blocks' work worse than BALANCE_FOR_HEADS (causal
    tiles of very different lengths piling up); then, and for varlen batches whose lengths the host
    does not know, "blocks" (longest work first)."""
    if config.order != "auto":
        return config.order
    if varlen:
        return "blocks"
    if m_blocks * pairs > 1 << 22:  # so many rounds that any order balances
        return "heads"
    balance = _heads_order_balance(
        m_blocks, pairs, grid, config.block_m, config.block_n, seqlen_q, seqlen_k, tuple(window)
    )
    return "heads" if balance >= BALANCE_FOR_HEADS else "blocks"


# ------------------------------------------------------------------ variants


@dataclass(frozen=True)
class HopperVariant:
    """Everything that changes the compiled kernel."""

    head_dim: int  # compiled (one of SHIPPED_HEAD_DIMS, FP8_HEAD_DIMS for fp8)
    consumers: int
    block_n: int
    q_stages: int
    dtype: str  # the inputs' (INPUTS)
    mask: int
    out_dtype: str = ""  # "bf16" or "fp16"; default: the inputs' (bf16 for fp8 inputs)

    def __post_init__(self) -> None:
        if not self.out_dtype:
            object.__setattr__(self, "out_dtype", "bf16" if self.fp8 else self.dtype)
        problems = []
        if self.dtype not in INPUTS:
            problems.append(f"dtype {self.dtype!r} not in {INPUTS}")
        if self.out_dtype not in ("bf16", "fp16") or (not self.fp8 and self.out_dtype != self.dtype):
            problems.append(f"out_dtype {self.out_dtype!r}: bf16 or fp16, the inputs' own for 16-bit inputs")
        if self.head_dim not in (FP8_HEAD_DIMS if self.fp8 else SHIPPED_HEAD_DIMS):
            problems.append(f"head_dim {self.head_dim} not in {FP8_HEAD_DIMS if self.fp8 else SHIPPED_HEAD_DIMS}")
        if self.fp8 and self.block_n not in (64, 128):
            problems.append(f"block_n {self.block_n}: fp8 V^T rows are 64 or 128 keys")
        if self.consumers not in (2, 3):
            problems.append(f"consumers {self.consumers} not 2 or 3")
        if self.block_n % 16 or not 16 <= self.block_n <= 256:
            problems.append(f"block_n {self.block_n} not a multiple of 16 in [16, 256]")
        if self.q_stages not in (1, 2):
            problems.append(f"q_stages {self.q_stages} not 1 or 2")
        if self.mask not in MASK_NAMES:
            problems.append(f"mask {self.mask} not in {sorted(MASK_NAMES)}")
        if self.launch_smem > MAX_SMEM:
            problems.append(f"{self.launch_smem} bytes of shared memory > {MAX_SMEM}")
        if problems:
            raise ValueError("invalid Hopper kernel variant: " + "; ".join(problems))

    @property
    def fp8(self) -> bool:
        return self.dtype in FP8_INPUTS

    @property
    def element_bytes(self) -> int:
        return 1 if self.fp8 else 2

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def swizzle(self) -> int:
        """Bytes of a slab row, the swizzle span: 128, or 64 where a row is not a multiple of 128 bytes."""
        return 128 if self.head_dim * self.element_bytes % 128 == 0 else 64

    @property
    def slab(self) -> int:
        """Columns per swizzle slab."""
        return self.swizzle // self.element_bytes

    @property
    def smem_bytes(self) -> int:
        """Shape::SMEM_BYTES of the kernel: the Q, K and V rings (fp8: and V^T's), the mbarriers."""
        kv_rings = 3 if self.fp8 else 2
        tiles = self.element_bytes * self.head_dim * (self.q_stages * self.block_m + kv_rings * STAGES * self.block_n)
        return tiles + 8 * (2 * self.q_stages + (6 if self.fp8 else 4) * STAGES)

    @property
    def launch_smem(self) -> int:
        return self.smem_bytes + SMEM_ALIGN_SLACK

    def defines(self) -> tuple[str, ...]:
        values = {
            "HOPPER_D": self.head_dim,
            "HOPPER_CONSUMERS": self.consumers,
            "HOPPER_BN": self.block_n,
            "HOPPER_Q_STAGES": self.q_stages,
            "HOPPER_INPUT": INPUTS.index(self.dtype),
            "HOPPER_OUT_BF16": int(self.out_dtype == "bf16"),
            "HOPPER_MASK": self.mask,
            "HOPPER_SMEM_BYTES": self.smem_bytes,
        }
        return tuple(f"-D{name}={value}" for name, value in values.items())

    def options(self) -> tuple[str, ...]:
        return (*BASE_OPTIONS, f"-arch={ARCH}", *self.defines())

    def label(self) -> str:
        out = f"->{self.out_dtype}" if self.fp8 else ""
        return (
            f"{self.dtype}{out} d{self.head_dim} {MASK_NAMES[self.mask]} "
            f"{self.block_m}x{self.block_n} c{self.consumers} q{self.q_stages}"
        )


def make_variant(config: HopperConfig, head_dim: int, dtype: str, mask: int, out_dtype: str = "") -> HopperVariant:
    d = compiled_head_dim(head_dim, dtype in FP8_INPUTS)
    return HopperVariant(d, config.consumers, config.block_n, config.q_stages, dtype, mask, out_dtype)


_variant = functools.lru_cache(maxsize=256)(make_variant)


def shipped_variants() -> list[HopperVariant]:
    """Every variant the tables can launch: one per 16-bit row and dtype, one per fp8 row and fp8
    type with a bf16 output (an fp16 output changes only the final rounding)."""
    sixteen = [make_variant(row.config, row.head_dim, dtype, row.mask) for row in TABLE for dtype in ("bf16", "fp16")]
    fp8 = [make_variant(row.config, row.head_dim, dtype, row.mask) for row in FP8_TABLE for dtype in FP8_INPUTS]
    return sixteen + fp8


# ------------------------------------------------------------------ source


def _operands(count: int, first: int = 0) -> str:
    return ", ".join(f"%{i}" for i in range(first, first + count))


#: PTX type names of the inputs.
_PTX_TYPES = {"fp16": "f16", "bf16": "bf16", "e4m3": "e4m3", "e5m2": "e5m2"}


def _wgmma_method(n: int, a_type: str, b_type: str, register_a: bool, transposed: bool = False) -> str:
    """One wgmma of the variant: k = 32 bytes of A and B types ``a_type``, ``b_type`` (INPUTS).
    ``transposed`` (16-bit, both operands in shared memory): A M-major and B N-major, method ``ss_t``
    (the backward's dQ = dS K)."""
    regs = n // 2
    acc = _operands(regs)
    outputs = ",\n          ".join(
        ", ".join(f'"+f"(d[{i}])' for i in range(j, min(j + 8, regs))) for j in range(0, regs, 8)
    )
    fp8 = a_type in FP8_INPUTS
    k = 32 if fp8 else 16
    instruction = f"wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{_PTX_TYPES[a_type]}.{_PTX_TYPES[b_type]}"
    # scale-d, scale-a, scale-b, then for 16-bit types whether A and B are transposed (8-bit types
    # are always K-major)
    if register_a:
        a, b, flag = f"{{{_operands(4, regs)}}}", f"%{regs + 4}", regs + 5
        tail = "p, 1, 1" if fp8 else "p, 1, 1, 1"  # 16-bit B N-major (transposed)
        signature = f"float (&d)[{regs}], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b, int accumulate"
        inputs = '"r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate)'
        what = f"A (64 x {k}) from registers, B ({k} x N) {'K' if fp8 else 'N'}-major in shared memory"
        name = "rs"
    elif transposed:
        assert not fp8, "8-bit wgmma reads both operands K-major"
        a, b, flag = f"%{regs}", f"%{regs + 1}", regs + 2
        tail = "p, 1, 1, 1, 1"  # A M-major, B N-major (both transposed)
        signature = f"float (&d)[{regs}], u64 desc_a, u64 desc_b, int accumulate"
        inputs = '"l"(desc_a), "l"(desc_b), "r"(accumulate)'
        what = f"A (64 x {k}) M-major and B ({k} x N) N-major in shared memory"
        name = "ss_t"
    else:
        a, b, flag = f"%{regs}", f"%{regs + 1}", regs + 2
        tail = "p, 1, 1" if fp8 else "p, 1, 1, 0, 0"  # A and B K-major
        signature = f"float (&d)[{regs}], u64 desc_a, u64 desc_b, int accumulate"
        inputs = '"l"(desc_a), "l"(desc_b), "r"(accumulate)'
        what = f"A (64 x {k}) and B ({k} x N) K-major in shared memory"
        name = "ss"
    return (
        f"  // D (+)= A B, {what}; D is overwritten when accumulate == 0.\n"
        f"  static __device__ __forceinline__ void {name}({signature}) {{\n"
        f"    asm volatile(\n"
        f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{flag}, 0;\\n"\n'
        f'        "{instruction} {{{acc}}}, {a}, {b}, {tail};\\n}}\\n"\n'
        f"        : {outputs}\n"
        f"        : {inputs});\n"
        f"  }}\n"
    )


def wgmma_source(variant: HopperVariant) -> str:
    """The wgmma instructions the variant uses: Q K^T (N = block_n, both operands in shared memory)
    and P V (N = head dim, P from registers; e4m3 for fp8 inputs)."""
    p_type = "e4m3" if variant.fp8 else variant.dtype
    parts = [
        f"// Generated by flash_cuda/hopper.py for {variant.label()}.",
        "namespace flash_cuda {",
        "namespace sm90 {",
    ]
    for n in sorted({variant.block_n, variant.head_dim}):
        methods = ""
        if n == variant.block_n:
            methods += _wgmma_method(n, variant.dtype, variant.dtype, register_a=False)
        if n == variant.head_dim:
            methods += _wgmma_method(n, p_type, variant.dtype, register_a=True)
        parts.append(f"template <>\nstruct Wgmma<{n}> {{\n{methods}}};")
    parts += ["}  // namespace sm90", "}  // namespace flash_cuda"]
    return "\n".join(parts)


def source(variant: HopperVariant) -> str:
    """The kernel source of ``variant``: every kernels/ include inlined once, the wgmma include generated."""
    return inline_includes(ENTRY_FILE, {GENERATED_INCLUDE: wgmma_source(variant)})


# ------------------------------------------------------------------ compile (CuPy) and launch


def kernel(variant: HopperVariant, device_index: int) -> int:
    """The CUfunction of ``variant`` on a device, compiled by NVRTC through CuPy (disk-cached)."""
    build = lambda: (source(variant), variant.options())  # noqa: E731
    return modules.functions(variant, device_index, build, (KERNEL_NAME,), variant.launch_smem)[0]


@functools.cache
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _input_names() -> dict[Any, str]:
    import torch

    return {getattr(torch, name): short for short, name in TORCH_DTYPES.items()}


def input_name(dtype: Any) -> str | None:
    """The INPUTS name of a torch dtype (None: the kernel does not take it)."""
    return _input_names().get(dtype)


def _reach(value: int) -> int:
    return UNBOUNDED_REACH if value < 0 else min(value, UNBOUNDED_REACH)


def _map_strides(t: Any) -> list[int]:
    """Byte strides of dims (heads, seqlen, batch) of a canonical (b, s, h, d) view, for TMA. A
    dimension of size 1 is never stepped along; it gets a stride TMA accepts."""
    item = t.element_size()
    sizes, strides = t.shape[:3], t.stride()[:3]
    fallback = max([s * item for s, n in zip(strides, sizes) if n > 1] + [16 * -(-t.shape[3] * item // 16)])
    return [strides[i] * item if sizes[i] > 1 else fallback for i in (2, 1, 0)]


def problem_reasons(
    *,
    capability: tuple[int, int],
    dtype: Any,
    head_dim: int,
    heads_q: int,
    heads_kv: int,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    total_q: int,
    total_k: int,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    scale: float,
) -> list[str]:
    """Why the kernel cannot take a problem of these sizes and options (empty: it can), before
    looking at any tensor's layout (:func:`layout_reasons`)."""
    reasons = []
    if capability != (9, 0):
        reasons.append(f"sm_{capability[0]}{capability[1]}: the Hopper kernel needs sm_90 (wgmma, TMA)")
    name = input_name(dtype)
    if name is None:
        reasons.append(f"dtype {dtype}: float16, bfloat16, float8_e4m3fn or float8_e5m2 only")
    fp8 = name in FP8_INPUTS
    multiple = 16 if fp8 else 8  # TMA rows of 16 bytes
    if head_dim % multiple or not multiple <= head_dim <= SHIPPED_HEAD_DIMS[-1]:
        reasons.append(
            f"head_dim {head_dim}: a multiple of {multiple} up to {SHIPPED_HEAD_DIMS[-1]} (TMA rows of 16 bytes)"
        )
    if heads_kv <= 0 or heads_q % heads_kv:
        reasons.append(f"heads_q {heads_q} is not a multiple of heads_kv {heads_kv}")
    if scale <= 0 or not math.isfinite(scale):
        reasons.append(f"scale {scale}: must be positive and finite (row maxima are taken before scaling)")
    if softcap < 0 or not math.isfinite(softcap):
        reasons.append(f"softcap {softcap}: must be >= 0 (0: off)")
    if total_k == 0:
        reasons.append("no key tokens: a TMA tensor map needs a non-empty tensor (the rows' output is 0, LSE -inf)")
    if max(seqlen_q, seqlen_k, total_q, total_k) > MAX_SEQLEN:
        reasons.append(f"sequences longer than {MAX_SEQLEN} tokens (32-bit tile arithmetic)")
    elif head_dim <= SHIPPED_HEAD_DIMS[-1] and heads_kv > 0:
        config = config_for(head_dim, window, seqlen_k, fp8)
        if -(-seqlen_q // config.block_m) * heads_q * batch > MAX_TILES:
            reasons.append("more than 2^31 - 1 tiles")
    return reasons


def layout_reasons(name: str, shape: tuple[int, ...], strides: tuple[int, ...], item: int, address: int) -> list[str]:
    """Why TMA cannot read the canonical ``(b, s, h, d)`` tensor ``name`` of this geometry (empty: it can)."""
    if strides[-1] != 1:
        return [f"{name} has stride {strides[-1]} along head_dim: TMA needs unit stride"]
    if any(s == 0 and n > 1 for s, n in zip(strides[:3], shape[:3])):
        return [f"{name} has a broadcast (stride-0) dimension: TMA needs real strides"]
    if address % 16 or any((s * item) % 16 for s, n in zip(strides[:3], shape[:3]) if n > 1):
        return [f"{name}: base address or strides not multiples of 16 bytes (TMA); .contiguous() fixes that"]
    if any(s * item >= 1 << 40 for s in strides[:3]):
        return [f"{name}: a stride of 2^40 bytes or more (TMA)"]
    return []


def unsupported_reasons(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    scale: float,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
) -> list[str]:
    """Why :func:`forward` cannot take this problem, as readable reasons (empty: it can).

    The tensors are canonical ``(batch, seqlen, heads, head_dim)`` views (varlen: batch 1); ``lse``
    is ``(batch, heads_q, seqlen_q)`` float32. Nothing here launches work on the GPU.
    """
    import torch

    if q.device.type != "cuda":
        return [f"tensors on {q.device}: the Hopper kernel runs on CUDA GPUs"]
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    reasons = problem_reasons(
        capability=torch.cuda.get_device_capability(q.device), dtype=q.dtype, head_dim=head_dim, heads_q=heads_q,
        heads_kv=heads_kv, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, total_q=q.shape[1],
        total_k=k.shape[1], window=window, softcap=softcap, scale=scale,
    )  # fmt: skip
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: all alike")
    fp8 = q.element_size() == 1
    if fp8 and out.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"out of fp8 inputs: bfloat16 or float16, not {out.dtype}")
    if not fp8 and out.dtype != q.dtype:
        reasons.append("out must have the inputs' dtype")
    if lse.dtype != torch.float32:
        reasons.append("lse must be float32")
    batch_heads = {"q_descale": (batch, heads_q), "k_descale": (batch, heads_kv), "v_descale": (batch, heads_kv)}
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            continue
        if not fp8:
            reasons.append(f"{name}: descale factors are for fp8 inputs")
        elif d.dtype != torch.float32 or d.device != q.device:
            reasons.append(f"{name}: float32 on {q.device}")
        elif d.numel() != 1 and tuple(d.shape) != batch_heads[name]:
            reasons.append(f"{name}: one value, or shape {batch_heads[name]} (batch, heads)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        reasons += layout_reasons(name, tuple(t.shape), tuple(t.stride()), t.element_size(), t.data_ptr())
    if out.stride(-1) != 1 or out.data_ptr() % 4 or any(s % 2 for s in out.stride()[:3]):
        reasons.append("out: rows must be contiguous along head_dim and 4-byte aligned (pairs are stored as one word)")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        reasons.append("cu_seqlens_q and cu_seqlens_k come together")
    elif cu_seqlens_q is not None and (
        cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32 or q.shape[0] != 1
    ):
        reasons.append("varlen: int32 cu_seqlens and a packed batch of 1")
    return reasons


#: The kernel's parameters (kernels/hopper_fwd.cu) in order, as tensor_map kinds.
PARAMETERS = tensor_map.ParamLayout(
    ("map",) * 3  # the tensor maps of q, k, v
    + ("ptr",) * 4  # o, lse, cu_q, cu_k
    + ("i64",) * 6  # strides of o and lse
    + ("i32",) * 12  # seqlen_q ... blocks_outer
    + ("f32",) * 2  # score_log2, softcap_in
    + ("ptr",) * 3  # the descales of q, k, v
    + ("i64",) * 6  # their (batch, head) strides
)


def scalar_arguments(
    out_strides: tuple[int, ...],
    lse_strides: tuple[int, ...],
    *,
    varlen: bool,
    seqlen_q: int,
    seqlen_k: int,
    total_q: int,
    total_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    m_blocks: int,
    tiles: int,
    window: tuple[int, int],
    order: str,
    softcap: float,
    scale: float,
) -> tuple[int | float, ...]:
    """The kernel's parameters from ``o_sb`` to ``softcap_in`` (``PARAMETERS.kinds[7:27]``), in order."""
    o_sb, o_ss, o_sh = out_strides[:3]
    l_sb, l_sh, l_ss = lse_strides
    if softcap > 0:
        score_log2, softcap_in = softcap * LOG2E, scale / softcap
    else:
        score_log2, softcap_in = scale * LOG2E, 0.0
    return (
        0 if varlen else o_sb, o_ss, o_sh, 0 if varlen else l_sb, l_sh, l_ss,
        seqlen_q, seqlen_k, total_q, total_k, heads_q, heads_q // heads_kv, head_dim, m_blocks, tiles,
        _reach(window[0]), _reach(window[1]), ORDERS.index(order),
        score_log2, softcap_in,
    )  # fmt: skip


def _descale_strides(d: Any) -> tuple[int, int]:
    """(batch, head) element strides of a descale tensor; 0, 0 for one value (or none)."""
    if d is None or d.numel() == 1:
        return (0, 0)
    return (d.stride(0), d.stride(1))


@dataclass(frozen=True)
class MapGeometry:
    """Everything of a TMA tensor map but its address."""

    dtype: str
    dims: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int


def geometry(t: Any, rows: int, dtype: str, slab: int, swizzle: int, varlen: bool = False) -> MapGeometry:
    """The TMA map of a canonical (b, s, h, d) view: dims (d, h, s, b), boxes of (slab, 1, rows, 1)
    (``dtype``: tensor_map's name; fp8 moves as "u8")."""
    b, s, h, d = t.shape
    return MapGeometry(dtype, (d, h, s, 1 if varlen else b), tuple(_map_strides(t)), (slab, 1, rows, 1), swizzle)


@functools.lru_cache(maxsize=1024)
def map_bytes(address: int, geometry: MapGeometry) -> bytes:
    """A tensor map's 128 bytes, encoded once per address (the kernel copies it by value at launch)."""
    g = geometry
    return bytes(tensor_map.encode_tiled(address, g.dtype, g.dims, g.strides, g.box, g.swizzle))


@dataclass(frozen=True, eq=False)
class Launch:
    """What one problem's launches share, decided on its first call: the kernel and its parameter
    packing, the grid, the tensor maps' geometry and every parameter that is not an address."""

    packed: tensor_map.PackedLaunch
    grid: int
    threads: int
    smem: int
    maps: tuple[MapGeometry, MapGeometry, MapGeometry]
    scalars: tuple[int | float, ...]
    descale_strides: tuple[int, ...]


#: Launches by problem key (:func:`forward`); cleared when full (a key holds shapes, not tensors).
_launches: dict[tuple, Launch | None] = {}
MAX_LAUNCHES = 1024


def _plan_launch(
    q: Any, k: Any, v: Any, out: Any, lse: Any, cu_q: Any, *, seqlen_q: int, seqlen_k: int, heads_q: int,
    heads_kv: int, head_dim: int, window: tuple[int, int], softcap: float, scale: float, config: HopperConfig | None,
    descales: tuple[Any, Any, Any], device: int,
) -> Launch | None:  # fmt: skip
    """The :class:`Launch` of a problem (None: no tiles, nothing to launch)."""
    varlen = cu_q is not None
    dtype = input_name(q.dtype)
    assert dtype is not None, q.dtype  # unsupported_reasons said so
    fp8 = dtype in FP8_INPUTS
    config = config or config_for(head_dim, window, seqlen_k, fp8)
    out_dtype = (input_name(out.dtype) or "") if fp8 else ""
    variant = _variant(config, head_dim, dtype, mask_kind(window), out_dtype)
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    m_blocks = -(-seqlen_q // variant.block_m)
    tiles = m_blocks * heads_q * batch
    if tiles == 0:
        return None
    grid = min(tiles, _sm_count(device))
    order = tile_order(
        config, m_blocks=m_blocks, pairs=tiles // m_blocks, grid=grid, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        window=window, varlen=varlen,
    )  # fmt: skip
    scalars = scalar_arguments(
        tuple(out.stride()), tuple(lse.stride()), varlen=varlen, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        total_q=q.shape[1], total_k=k.shape[1], heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
        m_blocks=m_blocks, tiles=tiles, window=window, order=order, softcap=softcap, scale=scale,
    )  # fmt: skip
    moved = "u8" if variant.fp8 else variant.dtype  # TMA moves fp8 as bytes
    maps = (
        geometry(q, variant.block_m, moved, variant.slab, variant.swizzle, varlen),
        geometry(k, variant.block_n, moved, variant.slab, variant.swizzle, varlen),
        geometry(v, variant.block_n, moved, variant.slab, variant.swizzle, varlen),
    )
    packed = tensor_map.packed_launch(kernel(variant, device), PARAMETERS)
    strides = tuple(s for d in descales for s in _descale_strides(d))
    return Launch(packed, grid, variant.threads, variant.launch_smem, maps, scalars, strides)


def forward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    scale: float,
    config: HopperConfig | None = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
) -> None:
    """Fill ``out`` (the inputs' dtype; bf16 or fp16 for fp8 inputs) and ``lse`` (float32) with one
    launch on torch's current stream. fp8 inputs: the values are ``q * q_descale`` and so on (float32
    descale factors, one value or one per (batch, head); None: 1).

    ``q, k, v, out``: canonical ``(batch, seqlen, heads, head_dim)`` views, any strides TMA takes
    (:func:`unsupported_reasons`); varlen: batch 1, seqlen = total tokens, int32 ``cu_seqlens_*``
    of the sequences' offsets and ``seqlen_q/k`` their maxima. ``lse``: ``(batch, heads_q, seqlen_q)``
    (varlen ``(1, heads_q, total_q)``). ``window = (left, right)``, -1 unbounded (causal: (-1, 0)).
    No host synchronisation and no allocation: CUDA-graph capturable.

    The host path is the per-call cost of small problems (decoding): everything but the addresses is
    decided once per problem (:class:`Launch`), tensor maps are encoded once per address.
    """

    device = q.get_device()
    window = (window[0], window[1])  # hashable, whatever sequence came in
    descales = (q_descale, k_descale, v_descale)
    cu_q = None if cu_seqlens_q is None else cu_seqlens_q.contiguous()
    cu_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
    key = (
        q.dtype, out.dtype, q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), lse.stride(),
        None if cu_q is None else cu_q.shape, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window,
        softcap, scale, config, device,
        *[None if d is None else (d.shape, d.stride()) for d in descales],
    )  # fmt: skip
    try:
        launch = _launches[key]
    except KeyError:
        if len(_launches) >= MAX_LAUNCHES:
            _launches.clear()
        launch = _launches[key] = _plan_launch(
            q, k, v, out, lse, cu_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_kv=heads_kv,
            head_dim=head_dim, window=window, softcap=softcap, scale=scale, config=config,
            descales=descales, device=device,
        )  # fmt: skip
    if launch is None:
        return
    gq, gk, gv = launch.maps
    values = (
        map_bytes(q.data_ptr(), gq), map_bytes(k.data_ptr(), gk), map_bytes(v.data_ptr(), gv),
        out.data_ptr(), lse.data_ptr(), 0 if cu_q is None else cu_q.data_ptr(), 0 if cu_k is None else cu_k.data_ptr(),
        *launch.scalars, *[0 if d is None else d.data_ptr() for d in descales], *launch.descale_strides,
    )  # fmt: skip
    on_current_stream(launch.packed, device, launch.grid, launch.threads, launch.smem, values)


def on_current_stream(
    packed: tensor_map.PackedLaunch, device: int, grid: int, threads: int, smem: int, values: tuple
) -> None:
    """One launch on torch's current stream of ``device``, made the current device for it if it is not
    (the kernel belongs to that device's context)."""
    import torch

    stream = torch._C._cuda_getCurrentRawStream(device)
    if torch._C._cuda_getDevice() == device:
        packed(grid, threads, smem, stream, values)
        return
    with torch.cuda.device(device):
        packed(grid, threads, smem, stream, values)
