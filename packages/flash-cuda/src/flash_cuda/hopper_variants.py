"""Hopper (sm_90a) forward kernel variants and their CUDA source.

A :class:`HopperVariant` is everything that changes the compiled kernel (tiles, input and output types,
mask kind); :func:`shipped_variants` lists every one the tile table (:mod:`flash_cuda.hopper_tiles`) can
launch, and :func:`source` writes a variant's kernel source: the kernels/ files inlined, the wgmma
instructions of its tile widths generated (:func:`wgmma_method`, which the backward's source uses too).
This module imports neither flash-core, torch nor CuPy.
"""

from __future__ import annotations

from dataclasses import dataclass

from flash_cuda.hopper_tiles import (
    FORWARD_MASK_NAMES,
    FP8_HEAD_DIMS,
    FP8_TABLE,
    MASK_INTERVALS,
    MASK_LISTS,
    SHIPPED_HEAD_DIMS,
    TABLE,
    HopperConfig,
    compiled_head_dim,
)
from flash_cuda.sources import inline_includes

KERNEL_NAME = "flash_fwd_sm90"
ENTRY_FILE = "hopper_fwd.cu"
#: The include that :func:`source` fills with the variant's wgmma instructions.
GENERATED_INCLUDE = "hopper_wgmma.cuh"
ARCH = "sm_90a"
BASE_OPTIONS = ("-std=c++17",)
#: Input types, in the kernel's numbering (Shape::INPUT).
INPUTS = ("fp16", "bf16", "e4m3", "e5m2")
FP8_INPUTS = ("e4m3", "e5m2")
#: Largest dynamic shared memory a block may opt in to on sm_90, bytes.
MAX_SMEM = 227 * 1024
#: Depth of the K and V rings (Shape::STAGES): the widest tiles fill shared memory with two, and a
#: third stage measured no faster where it fits (run 1: d128 128x128, 626 vs 633 TFLOP/s).
STAGES = 2
#: Slack for aligning the shared-memory base to the 1024-byte swizzle period inside the kernel.
SMEM_ALIGN_SLACK = 1024


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
        if self.mask not in FORWARD_MASK_NAMES or (self.fp8 and self.mask in (MASK_INTERVALS, MASK_LISTS)):
            problems.append(
                f"mask {self.mask} not in {sorted(FORWARD_MASK_NAMES)} (intervals: 16-bit inputs, as block lists)"
            )
        if self.mask == MASK_LISTS and (self.consumers != 2 or self.block_n & (self.block_n - 1)):
            problems.append("block lists: two consumers (a 128-row block row) and a power-of-two block_n")
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
        """Shape::SMEM_BYTES of the kernel: the Q, K and V rings (fp8: V^T in the V ring), the mbarriers."""
        tiles = self.element_bytes * self.head_dim * (self.q_stages * self.block_m + 2 * STAGES * self.block_n)
        return tiles + 8 * (2 * self.q_stages + 4 * STAGES)

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
            f"{self.dtype}{out} d{self.head_dim} {FORWARD_MASK_NAMES[self.mask]} "
            f"{self.block_m}x{self.block_n} c{self.consumers} q{self.q_stages}"
        )


def make_variant(config: HopperConfig, head_dim: int, dtype: str, mask: int, out_dtype: str = "") -> HopperVariant:
    d = compiled_head_dim(head_dim, dtype in FP8_INPUTS)
    return HopperVariant(d, config.consumers, config.block_n, config.q_stages, dtype, mask, out_dtype)


def shipped_variants() -> list[HopperVariant]:
    """Every variant the tables can launch: one per 16-bit row and dtype, one per fp8 row and fp8 type
    with a bf16 output (an fp16 output changes only the final rounding)."""
    sixteen = [make_variant(row.config, row.head_dim, dtype, row.mask) for row in TABLE for dtype in ("bf16", "fp16")]
    fp8 = [make_variant(row.config, row.head_dim, dtype, row.mask) for row in FP8_TABLE for dtype in FP8_INPUTS]
    return sixteen + fp8


# ------------------------------------------------------------------ source: the generated wgmma include


def _operands(count: int, first: int = 0) -> str:
    return ", ".join(f"%{i}" for i in range(first, first + count))


#: PTX type names of the inputs.
_PTX_TYPES = {"fp16": "f16", "bf16": "bf16", "e4m3": "e4m3", "e5m2": "e5m2"}


def wgmma_method(n: int, a_type: str, b_type: str, register_a: bool, transposed: bool = False) -> str:
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
    # The first line still names hopper.py (the module this came from): changing it would change every
    # variant's source, hence CuPy's disk-cache key, for nothing.
    parts = [
        f"// Generated by flash_cuda/hopper.py for {variant.label()}.",
        "namespace flash_cuda {",
        "namespace sm90 {",
    ]
    for n in sorted({variant.block_n, variant.head_dim}):
        methods = ""
        if n == variant.block_n:
            methods += wgmma_method(n, variant.dtype, variant.dtype, register_a=False)
        if n == variant.head_dim:
            methods += wgmma_method(n, p_type, variant.dtype, register_a=True)
        parts.append(f"template <>\nstruct Wgmma<{n}> {{\n{methods}}};")
    parts += ["}  // namespace sm90", "}  // namespace flash_cuda"]
    return "\n".join(parts)


def source(variant: HopperVariant) -> str:
    """The kernel source of ``variant``: every kernels/ include inlined once, the wgmma include generated."""
    return inline_includes(ENTRY_FILE, {GENERATED_INCLUDE: wgmma_source(variant)})
