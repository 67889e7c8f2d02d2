"""Hopper (sm_90a) FlashAttention backward (issue 14): variants, source, compile and launch.

The kernel (``kernels/hopper_bwd.cuh``, design comment at its top) runs one thread block per (batch,
KV head, 128 keys): K and V stay in shared memory, dK and dV in registers, Q, dO, LSE and delta
stream through a TMA ring, the five products are wgmma; dQ goes to an fp32 workspace by vectorised
global reductions. Two memory-bound passes around it (``kernels/hopper_bwd_rows.cu``): the LSE in base 2 and delta =
rowsum(dO o O) into padded per-row buffers before, dQ = workspace * scale in the inputs' dtype after.
Packed (varlen) batches compile as their own variants (``BwdVariant.varlen``): the fixed-length
kernels do not carry the offsets' code; the buffers keep each sequence on whole query blocks
(``kernels/hopper_bwd_packed.cuh``, :func:`packed_rows`). Masks beyond causal/window compile as
their own variants too (``BwdVariant.extra``): a key-padding mask or key intervals (one interval of
keys per query), both read through the tables of :func:`make_padding_tables` and :func:`make_interval_tables` (made
once per mask tensor, :func:`flash.masking.made_once`).
ALiBi compiles as its own variants (``BwdVariant.alibi``), causal/window with right reach 0 only
(:data:`ALIBI_MASK_KINDS`): the bias is folded into LSE_2 (per query) and added per score (per key).

Kernel-level API (what the backend wires in): :func:`problem_reasons`, :func:`layout_reasons` and
:func:`backward`. Like :mod:`flash_cuda.hopper` this imports neither flash-core nor CuPy at import.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from flash_cuda import hopper, hopper_tiles, hopper_variants, modules, tensor_map
from flash_cuda.hopper import on_current_stream as run
from flash_cuda.sources import inline_includes

KERNEL_NAME = "flash_bwd_sm90"
ENTRY_FILE = "hopper_bwd.cu"
#: The passes around it (LSE_2 and delta before, dQ's conversion after), one module per 16-bit type.
ROWS_FILE = "hopper_bwd_rows.cu"
ROWS_KERNELS = ("flash_bwd_rows", "flash_bwd_dq")
#: Compiled head dims; a problem's head dim rounds up (zero-filled columns). 192 and 256 would need
#: dK and dV accumulators of 192-256 registers per thread with two consumer warpgroups of 64 keys.
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16")
#: Keys per thread block (two consumer warpgroups of 64) and query rows per step (Shape in the .cuh).
BLOCK_N = 128
BLOCK_M = 64
STAGES = 2
THREADS = 384
SWIZZLE = 128
LOG2E = hopper.LOG2E
MAX_GRID = 2**31 - 1
#: The consumer structure the backend launches per compiled head dim (BwdVariant.pipelined).
PIPELINED = {64: True, 128: False}
#: Head dims the pipelined consumer compiles for without spilling (d128: 40+ words, PERF_NOTES.md).
PIPELINED_HEAD_DIMS = (64,)


@dataclass(frozen=True)
class BwdVariant:
    """Everything that changes the compiled backward kernel."""

    head_dim: int  # compiled (HEAD_DIMS)
    dtype: str  # "fp16" or "bf16"
    mask: int  # hopper_tiles.MASK_NONE, MASK_RIGHT (causal) or MASK_BOTH (window)
    pipelined: bool = False  # consume_pipelined (dQ one step behind, no per-step barrier), else consume
    varlen: bool = False  # packed sequences (cu_seqlens); fixed-length batches compile without that code
    deterministic: bool = False  # dQ's reductions in a fixed order of the key blocks (DqTurns in the .cuh)
    softcap: bool = False  # scores cap * tanh(raw * scale / cap)
    extra: bool = False  # a key-padding mask or key intervals, through the host's tables
    alibi: bool = False  # scores - slope |i + off - j| (right reach 0: ALIBI_MASK_KINDS, no other option)

    def __post_init__(self) -> None:
        problems = []
        if self.head_dim not in HEAD_DIMS:
            problems.append(f"head_dim {self.head_dim} not in {HEAD_DIMS}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.mask not in hopper_tiles.MASK_NAMES:
            problems.append(f"mask {self.mask} not in {sorted(hopper_tiles.MASK_NAMES)}")
        if self.varlen and self.deterministic:
            problems.append("varlen with deterministic (the dQ turns assume one length per batch)")
        if self.extra and (self.varlen or self.deterministic or self.softcap):
            problems.append("extra mask with varlen, deterministic or softcap (not compiled)")
        if self.alibi and (self.mask not in ALIBI_MASK_KINDS or self.varlen or self.deterministic or self.softcap
                           or self.extra):  # fmt: skip
            problems.append("alibi without causal/window, or with another option (not compiled)")
        if self.pipelined and self.head_dim not in PIPELINED_HEAD_DIMS:
            problems.append(f"the pipelined consumer spills at head_dim {self.head_dim} ({PIPELINED_HEAD_DIMS} only)")
        if problems:
            raise ValueError("invalid Hopper backward variant: " + "; ".join(problems))

    # what hopper's TMA helpers read from a variant
    fp8 = False
    element_bytes = 2
    swizzle = SWIZZLE
    slab = SWIZZLE // 2
    block_n = BLOCK_N
    block_m = BLOCK_M
    threads = THREADS

    @property
    def smem_bytes(self) -> int:
        """Shape::SMEM_BYTES: K, V, the Q and dO rings, the dS^T tiles (2 buffers x 2 warpgroups), one
        fp32 dQ staging tile (64 x 64) per warpgroup, the LSE/delta rings, an extra mask's query range
        per key (8 bytes), ALiBi's slope per stage (16 bytes), 9 mbarriers (deterministic: 4 more, the dQ writer's)."""
        d = self.head_dim
        tiles = 2 * (2 * BLOCK_N * d + 2 * STAGES * BLOCK_M * d + 4 * 64 * BLOCK_M)
        barriers = 1 + 2 * STAGES + 4 + (4 if self.deterministic else 0)
        keys = 8 * BLOCK_N if self.extra else 0
        slopes = 16 if self.alibi else 0
        return tiles + 2 * BLOCK_M * self.slab * 4 + 2 * STAGES * BLOCK_M * 4 + keys + slopes + 8 * barriers

    @property
    def launch_smem(self) -> int:
        return self.smem_bytes + hopper_variants.SMEM_ALIGN_SLACK

    def defines(self) -> tuple[str, ...]:
        values = {
            "HOPPER_BWD_D": self.head_dim,
            "HOPPER_BWD_INPUT": hopper_variants.INPUTS.index(self.dtype),
            "HOPPER_BWD_MASK": self.mask,
            "HOPPER_BWD_PIPELINED": int(self.pipelined),
            "HOPPER_BWD_VARLEN": int(self.varlen),
            "HOPPER_BWD_DETERMINISTIC": int(self.deterministic),
            "HOPPER_BWD_SOFTCAP": int(self.softcap),
            "HOPPER_BWD_EXTRA": int(self.extra),
            "HOPPER_BWD_ALIBI": int(self.alibi),
            "HOPPER_BWD_SMEM_BYTES": self.smem_bytes,
        }
        return tuple(f"-D{name}={value}" for name, value in values.items())

    def options(self) -> tuple[str, ...]:
        return (*hopper_variants.BASE_OPTIONS, f"-arch={hopper_variants.ARCH}", *self.defines())

    def label(self) -> str:
        options = {"pipelined": self.pipelined, "varlen": self.varlen, "deterministic": self.deterministic,
                   "softcap": self.softcap, "extra mask": self.extra, "alibi": self.alibi}  # fmt: skip
        flags = [name for name, on in options.items() if on]
        mask = hopper_tiles.MASK_NAMES[self.mask]
        return " ".join([f"bwd {self.dtype} d{self.head_dim} {mask} {BLOCK_N}x{BLOCK_M}", *flags])


def compiled_head_dim(head_dim: int) -> int:
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim {head_dim} > {HEAD_DIMS[-1]}")


#: The option combinations compiled, as (varlen, deterministic, softcap): each alone, and softcap with
#: either of the others (deterministic turns assume one length per batch: no varlen with it).
OPTIONS = (
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (True, False, True),
    (False, True, True),
)


def shipped_variants() -> list[BwdVariant]:
    """Every variant: both consumer structures where both compile without spilling (the backend
    launches PIPELINED's; the other stays for A/B timings) without options, and the launched
    structure for each combination of :data:`OPTIONS`, with an extra mask (every causal/window
    kind, no option), and with ALiBi (:data:`ALIBI_MASK_KINDS`, no option)."""
    return (
        [
            BwdVariant(d, dtype, mask, pipelined, *options)
            for options in OPTIONS
            for d in HEAD_DIMS
            for dtype in DTYPES
            for mask in sorted(hopper_tiles.MASK_NAMES)
            for pipelined in ((False, True) if d in PIPELINED_HEAD_DIMS and not any(options) else (PIPELINED[d],))
        ]
        + [
            BwdVariant(d, dtype, mask, PIPELINED[d], extra=True)
            for d in HEAD_DIMS
            for dtype in DTYPES
            for mask in EXTRA_MASK_KINDS
        ]
        + [
            BwdVariant(d, dtype, mask, PIPELINED[d], alibi=True)
            for d in HEAD_DIMS
            for dtype in DTYPES
            for mask in ALIBI_MASK_KINDS
        ]
    )


#: Causal/window kinds compiled with an extra mask. Without causal/window an extra mask runs the
#: causal variant with an unbounded right reach (:func:`extra_window`): the same masking, and the
#: variant of its own spilled 8 bytes at d128 (ptxas, NVRTC 13).
EXTRA_MASK_KINDS = (hopper_tiles.MASK_RIGHT, hopper_tiles.MASK_BOTH)


#: Causal/window kinds compiled with ALiBi. The kernel takes |i + off - j| as i + off - j, true for
#: every key a right reach of 0 lets a query see (:func:`problem_reasons` declines other reaches).
ALIBI_MASK_KINDS = (hopper_tiles.MASK_RIGHT, hopper_tiles.MASK_BOTH)


def extra_window(window: tuple[int, int]) -> tuple[int, int]:
    """The window an extra mask's backward runs with: an unbounded one as a causal one whose right
    reach no key exceeds (the kernel then masks by the extra mask alone), others as they are."""
    left, right = window
    return (left, hopper.UNBOUNDED_REACH) if left < 0 and right < 0 else window


# ------------------------------------------------------------------ source


def wgmma_source(variant: BwdVariant) -> str:
    """The wgmma instructions of the variant: S^T and dP^T (N = BLOCK_M, shared-memory operands),
    dQ = dS K (N = one 64-column slab, both operands transposed), dV and dK (N = head dim, A from
    registers)."""
    t = variant.dtype
    methods: dict[int, str] = {BLOCK_M: "", variant.slab: ""}
    methods.setdefault(variant.head_dim, "")
    methods[BLOCK_M] += hopper_variants.wgmma_method(BLOCK_M, t, t, register_a=False)
    methods[variant.slab] += hopper_variants.wgmma_method(variant.slab, t, t, register_a=False, transposed=True)
    methods[variant.head_dim] += hopper_variants.wgmma_method(variant.head_dim, t, t, register_a=True)
    parts = [
        f"// Generated by flash_cuda/hopper_bwd.py for {variant.label()}.",
        "namespace flash_cuda {",
        "namespace sm90 {",
    ]
    for n in sorted(methods):
        parts.append(f"template <>\nstruct Wgmma<{n}> {{\n{methods[n]}}};")
    parts += ["}  // namespace sm90", "}  // namespace flash_cuda"]
    return "\n".join(parts)


def source(variant: BwdVariant) -> str:
    return inline_includes(ENTRY_FILE, {hopper_variants.GENERATED_INCLUDE: wgmma_source(variant)})


# ------------------------------------------------------------------ compile (CuPy)


def kernel(variant: BwdVariant, device_index: int) -> int:
    """The CUfunction of ``variant`` on a device, compiled by NVRTC through CuPy (disk-cached)."""
    build = lambda: (source(variant), variant.options())  # noqa: E731
    return modules.functions(variant, device_index, build, (KERNEL_NAME,), variant.launch_smem)[0]


def row_source() -> str:
    return inline_includes(ROWS_FILE)


def row_options(dtype: str) -> tuple[str, ...]:
    return (*hopper_variants.BASE_OPTIONS, f"-arch={hopper_variants.ARCH}", f"-DBWD_BF16={int(dtype == 'bf16')}")


def row_kernels(dtype: str, device_index: int) -> tuple[int, int]:
    """The CUfunctions (rows, dq) of the passes around the main kernel for a 16-bit type."""
    build = lambda: (row_source(), row_options(dtype))  # noqa: E731
    rows, dq = modules.functions(("backward rows", dtype), device_index, build, ROWS_KERNELS)
    return rows, dq


# ------------------------------------------------------------------ what it takes


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
    scale: float,
    varlen: bool = False,
    softcap: float = 0.0,
    dropout: bool = False,
    deterministic: bool = False,
    key_padding: bool = False,
    key_intervals: bool = False,
    alibi: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> list[str]:
    """Why the backward kernel cannot take a problem (empty: it can), before any tensor's layout.
    Varlen: ``batch`` sequences, ``seqlen_*`` the longest, ``total_*`` the packed tokens.
    ``key_padding``/``key_intervals``: a key-padding mask, key intervals (a block mask's); ``alibi``:
    ALiBi slopes, with the (left, right) ``window`` (-1: unbounded; causal's right is 0)."""
    reasons = []
    masks = " and ".join(name for name, on in (("key padding", key_padding), ("key intervals", key_intervals)) if on)
    if masks and deterministic:
        reasons.append(f"deterministic with {masks}: the dQ turns follow the causal/window ranges only")
    if masks and softcap:
        reasons.append(f"softcap with {masks}: no such variant is compiled")
    reasons += _alibi_reasons(alibi, window, varlen, softcap, deterministic, masks)

    if capability != (9, 0):
        reasons.append(f"sm_{capability[0]}{capability[1]}: the Hopper backward needs sm_90 (wgmma, TMA)")
    name = hopper.input_name(dtype)
    if name not in DTYPES:
        reasons.append(f"dtype {dtype}: the Hopper backward takes float16 and bfloat16")
    if head_dim % 8 or not 8 <= head_dim <= HEAD_DIMS[-1]:
        reasons.append(
            f"head_dim {head_dim}: the Hopper backward has head dims up to {HEAD_DIMS[-1]} (multiples of 8); "
            "192/256 would need more accumulator registers than two 64-key warpgroups have"
        )
    if heads_kv <= 0 or heads_q % heads_kv:
        reasons.append(f"heads_q {heads_q} is not a multiple of heads_kv {heads_kv}")
    if softcap < 0 or not math.isfinite(softcap):
        reasons.append(f"softcap {softcap}: must be >= 0 (0: off)")
    if varlen and deterministic:
        reasons.append("deterministic with varlen: the deterministic dQ order assumes one length per batch")
    if dropout:
        reasons.append("dropout: the Hopper backward does not regenerate the core's dropout mask yet")
    if scale <= 0 or not math.isfinite(scale):
        reasons.append(f"scale {scale}: must be positive and finite")
    if 0 in (seqlen_q, seqlen_k, total_q, total_k):
        reasons.append("an empty problem (nothing for TMA to map)")
    if max(seqlen_q, seqlen_k) > hopper.MAX_SEQLEN:
        reasons.append(f"sequences longer than {hopper.MAX_SEQLEN} tokens (32-bit tile arithmetic)")
    elif varlen and max(total_k, packed_rows(total_q, batch)) > hopper.MAX_SEQLEN:
        reasons.append(
            f"varlen: more than {hopper.MAX_SEQLEN} packed keys, or query rows padded to whole "
            f"{BLOCK_M}-row blocks per sequence (32-bit tile arithmetic)"
        )
    elif heads_kv > 0 and -(-seqlen_k // BLOCK_N) * heads_kv * batch > MAX_GRID:
        reasons.append("more than 2^31 - 1 thread blocks")
    return reasons


def _alibi_reasons(alibi: bool, window: tuple[int, int], varlen: bool, softcap: float, deterministic: bool,
                   masks: str) -> list[str]:  # fmt: skip
    """Why the backward cannot take ALiBi with the call's other options (empty: it can, or no ALiBi)."""
    if not alibi:
        return []
    reasons = []
    if window[1] != 0:
        reasons.append(
            f"alibi with right reach {window[1]} (-1: unbounded): the kernel takes |i + off - j| as i + off - j, "
            "which needs causal or a window with right reach 0"
        )
    others = [name for name, on in (("varlen", varlen), ("softcap", softcap), ("deterministic", deterministic),
                                    (masks, masks)) if on]  # fmt: skip
    if others:
        reasons.append(f"alibi with {', '.join(others)}: no such variant is compiled")
    return reasons


def packed_rows(total_q: int, batch: int) -> int:
    """Rows per head of the per-row buffers (and dQ's workspace) of a packed batch of ``batch``
    sequences and ``total_q`` query tokens: sequence b's blocks start at block cu_q[b] // BLOCK_M + b
    (kernels/hopper_bwd_packed.cuh), so that each starts on a whole block."""
    return (total_q // BLOCK_M + batch) * BLOCK_M


def layout_reasons(name: str, shape: tuple[int, ...], strides: tuple[int, ...], item: int, address: int) -> list[str]:
    """Why TMA cannot read the canonical ``(b, s, h, d)`` tensor ``name`` (empty: it can)."""
    return hopper.layout_reasons(name, shape, strides, item, address)


# ------------------------------------------------------------------ launch


#: ALiBi's slopes and their batch and head strides in floats (null: no ALiBi), the last parameters of the
#: main kernel and the rows pass.
SLOPES = ("ptr", "i64", "i64")
#: The kernels' parameters in order (kernels/hopper_bwd.cu, hopper_bwd_rows.cu), as tensor_map kinds.
PARAMETERS = tensor_map.ParamLayout(
    ("map",) * 4  # the tensor maps of q, k, v, dout
    + ("ptr",) * 5  # dk, dv, dq_acc, lse2, delta
    + ("i64",) * 6  # strides of dk and dv
    + ("i32",) * 8  # seqlen_q ... win_right
    + ("f32",) * 2  # score_log2, scale
    + ("ptr",) * 2  # cu_q, cu_k (null at fixed length)
    + ("i32",) * 2  # total_q, total_k
    + ("ptr", "f32", "f32")  # dq_turns, softcap_in, softcap_t2
    + ("ptr", "ptr", "i64", "i64")  # an extra mask's tables and their batch strides (null: none)
    + SLOPES
)
PACKED_ROWS = ("ptr", "i32", "i32")  # the passes' cu_q, batch, total_q
ROWS_PARAMETERS = tensor_map.ParamLayout(("ptr",) * 5 + ("i64",) * 9 + ("i32",) * 4 + ("i64",) + PACKED_ROWS + SLOPES)
DQ_PARAMETERS = tensor_map.ParamLayout(("ptr",) * 2 + ("i64",) * 3 + ("i32",) * 5 + ("f32", "i64") + PACKED_ROWS)


class Queries(NamedTuple):
    """Where the query rows lie, for the passes around the main kernel: ``seqlen`` (varlen: the
    longest sequence), and in a packed batch the int32 offsets ``cu`` of its ``batch`` sequences."""

    seqlen: int
    cu: Any = None
    batch: int = 0

    def arguments(self, total: int) -> tuple[int, int, int]:
        """The passes' last parameters (PACKED_ROWS): null and zeros at fixed length."""
        return (0, 0, 0) if self.cu is None else (self.cu.data_ptr(), self.batch, total)


@dataclass(frozen=True, eq=False)
class Launches:
    """What one problem's backward launches share, decided on its first call: the kernels and their
    parameter packing, the grid, the tensor maps' geometry and the size parameters."""

    variant: BwdVariant
    rows: tensor_map.PackedLaunch
    main: tensor_map.PackedLaunch
    dq: tensor_map.PackedLaunch
    s_pad: int  # rows per (batch row, head) of the per-row buffers and dQ's workspace
    grid: int
    maps: tuple[hopper.MapGeometry, ...]  # q, k, v, dout
    sizes: tuple[int | float, ...]  # the main kernel's parameters from seqlen_q to scale
    sequences: int  # the batch's sequences (packed or not)
    softcap: tuple[float, float]  # its last parameters, softcap_in and softcap_t2 (0 without softcap)

    @property
    def seqlen_q(self) -> int:
        """The query sequences' length (varlen: the longest), the first of :attr:`sizes`."""
        return int(self.sizes[0])


#: Launches by problem key (:func:`backward`); cleared when full (a key holds shapes, not tensors).
_launches: dict[tuple, Launches] = {}
MAX_LAUNCHES = 1024


def _check_packed(q: Any, k: Any, cu_q: Any, cu_k: Any, max_seqlen_q: int | None, max_seqlen_k: int | None) -> None:
    """ValueError naming the argument where a packed (varlen) batch's arguments do not fit together."""
    import torch

    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k: both or neither")
    if cu_q is None:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k: only with cu_seqlens_q/cu_seqlens_k")
        return
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            found = f"{cu.dtype} {tuple(cu.shape)} on {cu.device}"
            raise ValueError(f"{name}: a 1-D int32 tensor on {q.device}, not {found}")
    if cu_q.numel() != cu_k.numel() or cu_q.numel() < 2:
        raise ValueError(f"cu_seqlens_k: batch + 1 offsets like cu_seqlens_q ({cu_q.numel()}), not {cu_k.numel()}")
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] != 1:
            raise ValueError(f"{name}: a packed batch is one canonical row of tokens, not batch {t.shape[0]}")
    for name, longest in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if longest is None or longest < 1:
            raise ValueError(f"{name}: the longest sequence of the packed batch (>= 1), not {longest}")


def _plan(q: Any, k: Any, v: Any, dout: Any, heads_q: int, heads_kv: int, head_dim: int, window: tuple[int, int],
          scale: float, softcap: float, deterministic: bool, pipelined: bool | None, device: int, cu_q: Any,
          cu_k: Any, max_seqlen_q: int | None, max_seqlen_k: int | None, extra: bool,
          alibi: bool) -> Launches:  # fmt: skip
    """The :class:`Launches` of a problem (its first call's tensors stand for its shapes and strides)."""
    _check_packed(q, k, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    varlen = cu_q is not None
    dtype = hopper.input_name(q.dtype)
    assert dtype in DTYPES, q.dtype
    d = compiled_head_dim(head_dim)
    structure = PIPELINED[d] if pipelined is None else pipelined
    mask = hopper_tiles.mask_kind(window)
    variant = _variant(d, dtype, mask, structure, varlen, deterministic, softcap > 0, extra, alibi)
    if varlen:
        assert max_seqlen_q is not None and max_seqlen_k is not None  # _check_packed said so
        batch, seqlen_q, seqlen_k = cu_q.numel() - 1, max_seqlen_q, max_seqlen_k
        s_pad = packed_rows(q.shape[1], batch)
    else:
        batch, seqlen_q = q.shape[:2]
        seqlen_k = k.shape[1]
        s_pad = -(-seqlen_q // BLOCK_M) * BLOCK_M
    rows_fn, dq_fn = row_kernels(dtype, device)
    maps = tuple(
        hopper.geometry(t, rows, variant.dtype, variant.slab, variant.swizzle, varlen)
        for t, rows in ((q, BLOCK_M), (k, BLOCK_N), (v, BLOCK_N), (dout, BLOCK_M))
    )
    score_log2, softcap_in, softcap_t2 = score_constants(scale, softcap)
    sizes = (
        seqlen_q, seqlen_k, s_pad, heads_q, heads_q // heads_kv, head_dim, hopper._reach(window[0]),
        hopper._reach(window[1]), score_log2, scale,
    )  # fmt: skip
    packed = tensor_map.packed_launch
    return Launches(
        variant, packed(rows_fn, ROWS_PARAMETERS), packed(kernel(variant, device), PARAMETERS),
        packed(dq_fn, DQ_PARAMETERS), s_pad, -(-seqlen_k // BLOCK_N) * heads_kv * batch, maps, sizes, batch,
        (softcap_in, softcap_t2),
    )  # fmt: skip


def score_constants(scale: float, softcap: float) -> tuple[float, float, float]:
    """The kernel's (score_log2, softcap_in, softcap_t2). Without softcap P = exp2(raw * scale log2 e -
    LSE_2); with it, as the forward's, P = exp2(t * cap log2 e - LSE_2) with t = tanh(raw * scale / cap),
    and dS's factor 1 - t^2 takes t^2 = (log2 P + LSE_2)^2 / (cap log2 e)^2."""
    if softcap > 0:
        return softcap * LOG2E, scale / softcap, (softcap * LOG2E) ** -2
    return scale * LOG2E, 0.0, 0.0


def dq_rows(dq_acc: Any, s_pad: int, head_dim: int) -> Any:
    """The dQ workspace (batch, heads, s_pad * D) as (batch, heads, s_pad, D) rows. The kernel writes
    it by 64 x 64 tiles (query block, head-dim slab), each in the accumulator's fragment order:
    float ((2 i + r) * 128 + t) * 2 + c holds row 16 (t / 32) + (t % 32) / 4 + 8 r, column
    8 i + 2 (t % 4) + c of the tile (thread t of the warpgroup, n8 tile i, row half r)."""
    b, h = dq_acc.shape[:2]
    blocks, slabs = s_pad // BLOCK_M, head_dim // (SWIZZLE // 2)
    # (b, h, block, slab, i, r, warp, lane row, lane col, c)
    t = dq_acc.view(b, h, blocks, slabs, 8, 2, 4, 8, 4, 2)
    # rows: warp, r, lane row; columns: slab, i, lane col, c
    return t.permute(0, 1, 2, 6, 5, 7, 3, 4, 8, 9).reshape(b, h, s_pad, head_dim)


def backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dout: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    *,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    window: tuple[int, int] = (-1, -1),
    scale: float,
    softcap: float = 0.0,
    deterministic: bool = False,
    pipelined: bool | None = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_padding: Any = None,
    key_intervals: Any = None,
    alibi_slopes: Any = None,
) -> None:
    """Fill ``dq``, ``dk``, ``dv`` on torch's current stream (``softcap``: the forward's, 0 for none;
    ``deterministic``: dQ bit-identical run to run; ``pipelined``: the consumer structure, None:
    :data:`PIPELINED`'s for the head dim). Tensors: canonical ``(batch, seqlen, heads, head_dim)``
    views TMA can read (``q``, ``k``, ``v``, ``dout``); ``lse``: float32 (batch, heads_q, seqlen_q),
    natural log (any backend's forward).

    Varlen: batch 1, seqlen = the packed tokens, int32 ``cu_seqlens_q/k`` (batch + 1 offsets each) and
    ``max_seqlen_q/k`` the longest sequences (longer ones are cut there, as by the forward); ``lse``
    (1, heads_q, total_q). Tokens outside every sequence get no gradient written.

    A mask beyond causal/window (fixed length only, intersected with causal/window): ``key_padding``, a
    boolean (batch|1, 1, 1, seqlen_k|1) mask; or ``key_intervals``, int32 (batch|1, 2, seqlen_q): query i
    sees keys [lo_i, hi_i), neither end moving left as i grows (:attr:`flash.BlockMask.key_intervals`).

    ALiBi (scores - slope |i + off - j|, flash core's definition): ``alibi_slopes`` float32 (heads_q,) or
    (batch, heads_q), with a right reach of 0 (causal, or a window with right 0) and no other option."""
    if layout_reasons("dout", tuple(dout.shape), tuple(dout.stride()), dout.element_size(), dout.data_ptr()):
        dout = dout.contiguous()  # e.g. a broadcast gradient: TMA needs real, 16-byte strides
    if layout_reasons("out", tuple(out.shape), tuple(out.stride()), out.element_size(), out.data_ptr()):
        out = out.contiguous()  # the rows pass reads 16 bytes at a time
    device = q.get_device()
    window = (window[0], window[1])
    cu_q = None if cu_seqlens_q is None else cu_seqlens_q.contiguous()
    cu_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
    packing = None if cu_q is None and cu_k is None else (_tensor_key(cu_q), _tensor_key(cu_k))
    extra_values = _extra_mask(q, k, cu_q, key_padding, key_intervals)
    extra = extra_values != NO_EXTRA
    slopes = _slopes(q, alibi_slopes, heads_q, window, cu_q is not None, softcap, deterministic, extra)
    alibi = slopes != NO_SLOPES
    if extra:
        window = extra_window(window)
    key = (
        q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.stride(), dout.stride(), heads_q, heads_kv, head_dim,
        window, scale, softcap, deterministic, pipelined, device, packing, max_seqlen_q, max_seqlen_k, extra, alibi,
    )  # fmt: skip
    try:
        plan = _launches[key]
    except KeyError:
        if len(_launches) >= MAX_LAUNCHES:
            _launches.clear()
        plan = _launches[key] = _plan(
            q, k, v, dout, heads_q, heads_kv, head_dim, window, scale, softcap, deterministic, pipelined, device, cu_q,
            cu_k, max_seqlen_q, max_seqlen_k, extra, alibi,
        )  # fmt: skip
    batch, s_pad = q.shape[0], plan.s_pad
    queries = Queries(plan.seqlen_q, cu_q, plan.sequences)
    lse2, delta = _rows(plan.rows, out, dout, lse, s_pad, heads_q, device, queries, slopes)
    dq_acc, turns = workspace(batch, heads_q, s_pad, plan.variant.head_dim, deterministic, q.device)
    gq, gk, gv, gdo = plan.maps
    offsets = (0, 0, 0, 0)  # fixed length: no cu_seqlens, no packed token counts
    if cu_q is not None and cu_k is not None:
        offsets = (cu_q.data_ptr(), cu_k.data_ptr(), q.shape[1], k.shape[1])
    values = (
        hopper.map_bytes(q.data_ptr(), gq), hopper.map_bytes(k.data_ptr(), gk), hopper.map_bytes(v.data_ptr(), gv),
        hopper.map_bytes(dout.data_ptr(), gdo), dk.data_ptr(), dv.data_ptr(), dq_acc.data_ptr(), lse2.data_ptr(),
        delta.data_ptr(), *dk.stride()[:3], *dv.stride()[:3], *plan.sizes, *offsets,
        0 if turns is None else turns.data_ptr(), *plan.softcap, *extra_values, *slopes,
    )  # fmt: skip
    run(plan.main, device, plan.grid, THREADS, plan.variant.launch_smem, values)
    pairs = dq_acc.numel() // 2
    values = (
        dq_acc.data_ptr(), dq.data_ptr(), *dq.stride()[:3], heads_q, queries.seqlen, s_pad, plan.variant.head_dim,
        head_dim, scale, pairs, *queries.arguments(q.shape[1]),
    )  # fmt: skip
    run(plan.dq, device, -(-pairs // 256), 256, 0, values)


#: The main kernel's last parameters (Params::blocks ... keys_sb) without a mask beyond causal/window.
NO_EXTRA = (0, 0, 0, 0)


def _extra_mask(q: Any, k: Any, cu_q: Any, key_padding: Any, key_intervals: Any) -> tuple[int, ...]:
    """The main kernel's last parameters for the call's mask beyond causal/window (its tables);
    ValueError naming the argument that does not fit."""
    import torch

    from flash.masking import made_once  # flash-core at call time only, as torch

    if key_padding is None and key_intervals is None:
        return NO_EXTRA
    if cu_q is not None:
        raise ValueError("key_padding/key_intervals: None with cu_seqlens (a packed batch has no such mask)")
    if key_padding is not None and key_intervals is not None:
        raise ValueError("key_intervals: None with key_padding (one mask beyond causal/window)")
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if key_intervals is not None:
        shape = tuple(key_intervals.shape)
        if key_intervals.dtype != torch.int32 or len(shape) != 3 or shape[0] not in (1, batch) \
                or shape[1:] != (2, seqlen_q) or key_intervals.device != q.device:  # fmt: skip
            found = f"{key_intervals.dtype} {shape} on {key_intervals.device}"
            raise ValueError(f"key_intervals: int32 ({batch}|1, 2, {seqlen_q}) on {q.device}, not {found}")
        blocks, keys = made_once(make_interval_tables, key_intervals, seqlen_q, seqlen_k)
    else:
        shape = tuple(key_padding.shape)
        if key_padding.dtype != torch.bool or len(shape) != 4 or shape[0] not in (1, batch) or shape[1:3] != (1, 1) \
                or shape[3] not in (1, seqlen_k) or key_padding.device != q.device:  # fmt: skip
            found = f"{key_padding.dtype} {shape} on {key_padding.device}"
            raise ValueError(f"key_padding: bool ({batch}|1, 1, 1, {seqlen_k}|1) on {q.device}, not {found}")
        blocks, keys = made_once(make_padding_tables, key_padding, seqlen_q, seqlen_k)
    wide = shape[0] > 1
    return blocks.data_ptr(), keys.data_ptr(), blocks.stride(0) * wide, keys.stride(0) * wide


#: The kernels' ALiBi parameters (SLOPES) without ALiBi.
NO_SLOPES = (0, 0, 0)


def _slopes(q: Any, slopes: Any, heads_q: int, window: tuple[int, int], varlen: bool, softcap: float,
            deterministic: bool, extra: bool) -> tuple[int, int, int]:  # fmt: skip
    """The kernels' ALiBi parameters (:data:`SLOPES`); ValueError naming ``alibi_slopes`` where they do
    not fit the call."""
    import torch

    if slopes is None:
        return NO_SLOPES
    batch, shape = q.shape[0], tuple(slopes.shape)
    if slopes.dtype != torch.float32 or shape not in ((heads_q,), (batch, heads_q)) or slopes.device != q.device:
        found = f"{slopes.dtype} {shape} on {slopes.device}"
        raise ValueError(f"alibi_slopes: float32 ({heads_q},) or ({batch}, {heads_q}) on {q.device}, not {found}")
    masks = "key padding or key intervals" if extra else ""
    reasons = _alibi_reasons(True, window, varlen, softcap, deterministic, masks)
    if reasons:
        raise ValueError("alibi_slopes: " + "; ".join(reasons))
    if slopes.dim() == 1:
        return slopes.data_ptr(), 0, slopes.stride(0)
    return slopes.data_ptr(), slopes.stride(0), slopes.stride(1)


def _key_blocks(device: Any, rows: int, seqlen_k: int) -> tuple[Any, Any]:
    """Each key block's first key and one past its last, int32 (rows, key blocks)."""
    import torch

    k0 = torch.arange(0, seqlen_k, BLOCK_N, device=device, dtype=torch.int32).expand(rows, -1).contiguous()
    return k0, (k0 + BLOCK_N).clamp(max=seqlen_k)


def make_padding_tables(mask: Any, seqlen_q: int, seqlen_k: int) -> tuple[Any, Any]:
    """The kernel's tables (Params::blocks, keys) of a key-padding mask, bool (B|1, 1, 1, Sk|1), by a
    few reductions on the device (no host sync): every query block sees a key block or none does,
    as one of its keys is visible or none is, and every one sees all of it when all its keys are;
    every query sees key j or none does."""
    import torch

    row = mask.expand(mask.shape[0], 1, 1, seqlen_k)[:, 0, 0, :]
    rows, key_blocks, every = row.shape[0], -(-seqlen_k // BLOCK_N), -(-seqlen_q // BLOCK_M)
    padded = torch.zeros(rows, key_blocks * BLOCK_N, dtype=torch.int32, device=row.device)
    padded[:, :seqlen_k] = row
    visible = padded.view(rows, key_blocks, BLOCK_N).sum(dim=-1, dtype=torch.int32)
    k0, k1 = _key_blocks(row.device, rows, seqlen_k)
    seen, full = torch.where(visible > 0, every, 0), torch.where(visible == k1 - k0, every, 0)
    blocks = torch.stack((torch.zeros_like(seen), seen, torch.zeros_like(full), full), dim=-1)
    keys = torch.stack((torch.zeros_like(padded[:, :seqlen_k]), torch.where(row, seqlen_q, 0)), dim=-1)
    return blocks.to(torch.int32).contiguous(), keys.to(torch.int32).contiguous()


def make_interval_tables(intervals: Any, seqlen_q: int, seqlen_k: int) -> tuple[Any, Any]:
    """The kernel's tables (Params::blocks, keys) of key intervals int32 (B|1, 2, Sq) (query i sees keys
    [lo_i, hi_i), both ends non-decreasing; a query that sees none: [0, 0), only before every other), by
    binary searches on the device (no host sync):

    * int32 (B|1, key blocks, 4): per key block [k0, k1) of BLOCK_N keys, the query blocks [m_lo, m_hi)
      with a row that sees one of its keys (rows from the first with hi > k0 to the first with lo >= k1;
      [0, 0) for none) and [free_lo, free_hi), those whose every row sees all of them (hi_{m0} >= k1 and
      lo_{m1 - 1} <= k0, rows past Sq aside);
    * int32 (B|1, Sk, 2): per key j the queries [first with hi > j, first with lo > j) that see it."""
    import torch

    lo, hi = intervals[:, 0].contiguous(), intervals[:, 1].contiguous()
    rows = lo.shape[0]
    k0, k1 = _key_blocks(lo.device, rows, seqlen_k)
    first, stop = torch.searchsorted(hi, k0, right=True), torch.searchsorted(lo, k1)
    full_from, full_until = torch.searchsorted(hi, k1), torch.searchsorted(lo, k0, right=True)
    seen = stop > first
    q_blocks = -(-seqlen_q // BLOCK_M)
    m_lo = torch.where(seen, first // BLOCK_M, 0)
    m_hi = torch.where(seen, -(-stop // BLOCK_M), 0)
    free_lo = -(-full_from // BLOCK_M)
    free_hi = torch.where(full_until >= seqlen_q, q_blocks, full_until // BLOCK_M)
    blocks = torch.stack((m_lo, m_hi, free_lo, free_hi), dim=-1).to(torch.int32).contiguous()
    keys = torch.arange(seqlen_k, device=lo.device, dtype=torch.int32).expand(rows, -1).contiguous()
    per_key = torch.stack((torch.searchsorted(hi, keys, right=True), torch.searchsorted(lo, keys, right=True)), -1)
    return blocks, per_key.to(torch.int32).contiguous()


def _tensor_key(t: Any) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def workspace(batch: int, heads: int, s_pad: int, d: int, deterministic: bool, device: Any) -> tuple[Any, Any]:
    """The zeroed fp32 dQ workspace (batch, heads, s_pad * d) and, in deterministic mode, the kernel's
    turn counters (one int32 per 64 x 64 dQ tile, indexed like the tiles; else None), zeroed by the
    same fill: they follow the workspace in one allocation."""
    import torch

    floats = batch * heads * s_pad * d
    tiles = floats // (BLOCK_M * SWIZZLE // 2) if deterministic else 0
    buffer = torch.zeros(floats + tiles, dtype=torch.float32, device=device)
    turns = buffer[floats:].view(torch.int32) if deterministic else None
    return buffer[:floats].view(batch, heads, s_pad * d), turns


def _rows(packed: tensor_map.PackedLaunch, out: Any, dout: Any, lse: Any, s_pad: int, heads: int, device: int,
          queries: Queries | None = None, slopes: tuple[int, int, int] = (0, 0, 0)) -> Any:  # fmt: skip
    """(LSE_2, delta) as float32 (batch, heads, s_pad) by the rows pass (one launch); ``queries``: None
    at fixed length (out's rows); ``slopes``: ALiBi's (:data:`SLOPES`, :data:`NO_SLOPES` for none)."""
    import torch

    b, sq, h, d = out.shape
    queries = queries or Queries(sq)
    for t in (out, dout):
        assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(x % 8 == 0 for x in t.stride()[:3]), "16-byte rows"
    lse2 = torch.empty((b, h, s_pad), dtype=torch.float32, device=out.device)
    delta = torch.empty_like(lse2)
    rows = b * h * s_pad
    values = (
        out.data_ptr(), dout.data_ptr(), lse.data_ptr(), lse2.data_ptr(), delta.data_ptr(),
        *out.stride()[:3], *dout.stride()[:3], *lse.stride(), heads, queries.seqlen, s_pad, d, rows,
        *queries.arguments(sq), *slopes,
    )  # fmt: skip
    run(packed, device, -(-rows // 8), 256, 0, values)
    return lse2, delta


_variant = functools.lru_cache(maxsize=64)(BwdVariant)
