"""Hopper (sm_90a) FlashAttention forward: what the kernel takes, and its launch.

The kernel (``kernels/hopper_fwd.cuh``) streams Q, K and V with TMA into swizzled shared memory,
multiplies with ``wgmma`` and splits each persistent thread block into one producer and two or three
consumer warpgroups (PERF_NOTES.md, "Hopper kernel"). This module imports neither flash-core nor,
until a kernel is compiled, CuPy: it works on canonical ``(batch, seqlen, heads, head_dim)`` views.
Its parts live in their own modules: the tile table and tile order in :mod:`flash_cuda.hopper_tiles`,
the kernel variants and their generated source in :mod:`flash_cuda.hopper_variants`.

Kernel-level API (what the backend wires in):

- :func:`flash_cuda.hopper_tiles.config_for` -- the tile configuration of a problem class, from its
  table;
- :func:`unsupported_reasons` -- why the kernel cannot take a problem (empty list: it can);
- :func:`forward` -- fill ``out`` and ``lse`` with one launch on torch's current stream (fp8: two,
  the V^T pre-pass first).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from flash_cuda import hopper_tiles, hopper_variants, modules, tensor_map
from flash_cuda.sources import inline_includes

#: Torch names of the input types (:data:`flash_cuda.hopper_variants.INPUTS`).
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
#: Stand-in for an unbounded window side; sequences are capped below it.
UNBOUNDED_REACH = 1 << 30
MAX_SEQLEN = (1 << 29) - 1
MAX_TILES = 2**31 - 1
LOG2E = 1.4426950408889634
#: fp8: the V^T pre-pass (kernels/hopper_fwd_vt.cu): its chunk of keys and its block size.
VT_FILE = "hopper_fwd_vt.cu"
VT_KERNEL = "flash_fwd_vt"
VT_CHUNK = 64
VT_THREADS = 256
#: Pre-pass blocks per SM (each loops over its share of chunks).
VT_BLOCKS_PER_SM = 16
#: A V^T row's columns (keys plus padding) stay below this: 32-bit TMA coordinates with room for a block.
MAX_VT_COLUMNS = 1 << 30


# ------------------------------------------------------------------ compile (CuPy) and launch


def kernel(variant: hopper_variants.HopperVariant, device_index: int) -> int:
    """The CUfunction of ``variant`` on a device, compiled by NVRTC through CuPy (disk-cached)."""
    build = lambda: (hopper_variants.source(variant), variant.options())  # noqa: E731
    kernel_name = hopper_variants.KERNEL_NAME
    return modules.functions(variant, device_index, build, (kernel_name,), variant.launch_smem)[0]


def vt_source() -> str:
    return inline_includes(VT_FILE)


def vt_options() -> tuple[str, ...]:
    return (*hopper_variants.BASE_OPTIONS, f"-arch={hopper_variants.ARCH}")


def vt_kernel(device_index: int) -> int:
    """The CUfunction of the fp8 V^T pre-pass on a device."""
    build = lambda: (vt_source(), vt_options())  # noqa: E731
    return modules.functions("fp8 V^T pre-pass", device_index, build, (VT_KERNEL,))[0]


#: The variant of a problem class (:func:`flash_cuda.hopper_variants.make_variant`), made once.
_variant = functools.lru_cache(maxsize=256)(hopper_variants.make_variant)


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


# ------------------------------------------------------------------ what the kernel takes


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
    intervals: bool = False,
    block_size: tuple[int, int] | None = None,
) -> list[str]:
    """Why the kernel cannot take a problem of these sizes and options (empty: it can), before
    looking at any tensor's layout (:func:`layout_reasons`). ``intervals``: each query row also has an
    interval of keys (a key-padding mask, a block mask's key_intervals); ``block_size``: the (rows, cols)
    of a block-sparse mask whose lists the tiles walk (None: none)."""
    reasons = []
    lists = block_size is not None
    if capability != (9, 0):
        reasons.append(f"sm_{capability[0]}{capability[1]}: the Hopper kernel needs sm_90 (wgmma, TMA)")
    name = input_name(dtype)
    if name is None:
        reasons.append(f"dtype {dtype}: float16, bfloat16, float8_e4m3fn or float8_e5m2 only")
    fp8 = name in hopper_variants.FP8_INPUTS
    multiple = 16 if fp8 else 8  # TMA rows of 16 bytes
    widest = hopper_tiles.SHIPPED_HEAD_DIMS[-1]
    if head_dim % multiple or not multiple <= head_dim <= widest:
        reasons.append(f"head_dim {head_dim}: a multiple of {multiple} up to {widest} (TMA rows of 16 bytes)")
    if heads_kv <= 0 or heads_q % heads_kv:
        reasons.append(f"heads_q {heads_q} is not a multiple of heads_kv {heads_kv}")
    if scale <= 0 or not math.isfinite(scale):
        reasons.append(f"scale {scale}: must be positive and finite (row maxima are taken before scaling)")
    if softcap < 0 or not math.isfinite(softcap):
        reasons.append(f"softcap {softcap}: must be >= 0 (0: off)")
    if intervals and fp8:
        reasons.append("fp8 inputs with a key-padding mask or key intervals: only 16-bit variants are compiled")
    if block_size is not None:
        reasons += _block_sparse_reasons(block_size, head_dim, window, fp8)
    if total_k == 0:
        reasons.append("no key tokens: a TMA tensor map needs a non-empty tensor (the rows' output is 0, LSE -inf)")
    if max(seqlen_q, seqlen_k, total_q, total_k) > MAX_SEQLEN:
        reasons.append(f"sequences longer than {MAX_SEQLEN} tokens (32-bit tile arithmetic)")
    elif fp8 and vt_columns(seqlen_k, total_k, batch, varlen=True) > MAX_VT_COLUMNS:
        reasons.append(f"fp8: keys plus 32 per sequence past {MAX_VT_COLUMNS} (the V^T pre-pass's columns)")
    elif head_dim <= widest and heads_kv > 0:
        config = hopper_tiles.config_for(head_dim, window, seqlen_k, fp8, intervals and not fp8, lists and not fp8)
        if -(-seqlen_q // config.block_m) * heads_q * batch > MAX_TILES:
            reasons.append("more than 2^31 - 1 tiles")
    return reasons


def _block_sparse_reasons(block_size: tuple[int, int], head_dim: int, window: tuple[int, int], fp8: bool) -> list[str]:
    """Why the block-list variants cannot walk a block-sparse mask of ``block_size`` blocks."""
    reasons = []
    if fp8:
        reasons.append("fp8 inputs with a block-sparse mask: only 16-bit variants are compiled")
    if window[0] >= 0 or window[1] >= 0:
        reasons.append("a block-sparse mask with causal or a window: the block-list variants apply no window")
    if head_dim > hopper_tiles.SHIPPED_HEAD_DIMS[-1]:
        return reasons  # declined already: no tiles to compare with
    rows, cols = block_size
    block_n = hopper_tiles.config_for(head_dim, lists=True).block_n
    if rows != hopper_tiles.BLOCK_SPARSE_ROWS or cols % block_n:
        reasons.append(
            f"block-sparse mask of {rows}x{cols} blocks: at head_dim {head_dim} the kernel walks one block row "
            f"of {hopper_tiles.BLOCK_SPARSE_ROWS} queries per tile and key blocks of {block_n}, which must divide "
            "the mask's"
        )
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


def _interval_reasons(q: Any, intervals: Any, runs: Any, mask: Any, varlen: bool) -> list[str]:
    """Why the interval tensors of :func:`forward` cannot be read (empty: they can, or there are none)."""
    import torch

    if intervals is None and runs is None and mask is None:
        return []
    if varlen:
        return ["key intervals or a key-padding mask with cu_seqlens: they index a padded batch"]
    if (intervals is None) == (runs is None) or (runs is None) != (mask is None):
        return ["key_intervals alone, or key_runs with key_mask (a key-padding mask)"]
    index = intervals if intervals is not None else runs
    if index.dtype != torch.int32 or index.device != q.device:
        return [f"key intervals: int32 on {q.device}"]
    if mask is not None and (mask.dtype != torch.bool or mask.device != q.device or mask.dim() != 4):
        return [f"key_mask: a bool (batch|1, 1, 1, seqlen_k) tensor on {q.device}"]
    return []


def _list_reasons(q: Any, lists: tuple[Any, Any, Any], shape: tuple[int, ...], varlen: bool) -> list[str]:
    """Why the block lists ``(kv_counts, kv_indices, block_size)`` of :func:`forward` cannot be read
    (empty: they can, or there are none). ``shape``: (batch, heads_q, seqlen_q, seqlen_k)."""
    import torch

    counts, indices, block_size = lists
    if all(x is None for x in lists):
        return []
    if any(x is None for x in lists) or varlen:
        return ["kv_counts, kv_indices and block_size together (a block-sparse mask's lists), without cu_seqlens"]
    batch, heads, seqlen_q, seqlen_k = shape
    rows = -(-seqlen_q // block_size[0])
    expect = [(b, h, rows, 2) for b in {1, batch} for h in {1, heads}]
    if tuple(counts.shape) not in expect or tuple(indices.shape) != (*counts.shape, -(-seqlen_k // block_size[1])):
        return [f"kv_counts (batch|1, heads_q|1, {rows}, 2), kv_indices (..., 2, key blocks): the mask's lists"]
    if any(t.dtype != torch.int32 or t.device != q.device or not t.is_contiguous() for t in (counts, indices)):
        return [f"kv_counts, kv_indices: contiguous int32 on {q.device}"]
    return ["more than 2^29 block rows (32-bit list offsets)"] if counts.numel() >= 1 << 30 else []


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
    key_intervals: Any = None,
    key_runs: Any = None,
    key_mask: Any = None,
    kv_counts: Any = None,
    kv_indices: Any = None,
    block_size: tuple[int, int] | None = None,
) -> list[str]:
    """Why :func:`forward` cannot take this problem, as readable reasons (empty: it can).

    The tensors are canonical ``(batch, seqlen, heads, head_dim)`` views (varlen: batch 1); ``lse``
    is ``(batch, heads_q, seqlen_q)`` float32; the interval tensors as :func:`forward` takes them.
    Nothing here launches work on the GPU.
    """
    import torch

    if q.device.type != "cuda":
        return [f"tensors on {q.device}: the Hopper kernel runs on CUDA GPUs"]
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    reasons = problem_reasons(
        capability=torch.cuda.get_device_capability(q.device), dtype=q.dtype, head_dim=head_dim, heads_q=heads_q,
        heads_kv=heads_kv, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, total_q=q.shape[1],
        total_k=k.shape[1], window=window, softcap=softcap, scale=scale,
        intervals=key_intervals is not None or key_runs is not None, block_size=block_size,
    )  # fmt: skip
    reasons += _interval_reasons(q, key_intervals, key_runs, key_mask, varlen=cu_seqlens_q is not None)
    reasons += _list_reasons(q, (kv_counts, kv_indices, block_size), (batch, heads_q, seqlen_q, seqlen_k),
                             varlen=cu_seqlens_q is not None)  # fmt: skip
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


# ------------------------------------------------------------------ launch


#: The kernel's parameters (kernels/hopper_fwd.cu) in order, as tensor_map kinds.
PARAMETERS = tensor_map.ParamLayout(
    ("map",) * 3  # the tensor maps of q, k, v (fp8: the pre-pass's V^T)
    + ("ptr",) * 4  # o, lse, cu_q, cu_k
    + ("i64",) * 6  # strides of o and lse
    + ("i32",) * 12  # seqlen_q ... blocks_outer
    + ("f32",) * 2  # score_log2, softcap_in
    + ("ptr",) * 3  # the descales of q, k, v
    + ("i64",) * 6  # their (batch, head) strides
    + ("ptr",) * 2  # mask kind 3: the intervals, the key-padding mask's bytes
    + ("i64",) * 3  # iv_sb, keys_sb, keys_sk
    + ("i32",) * 3  # iv_ss, iv_hi, iv_full
    + ("ptr",) * 2  # mask kind 4: a block-sparse mask's counts and indices
    + ("i32",) * 4  # bl_sb, bl_sh, bl_nk, bl_shift
)
#: The fp8 V^T pre-pass's parameters (kernels/hopper_fwd_vt.cu) in order.
VT_PARAMETERS = tensor_map.ParamLayout(
    ("ptr",) * 3  # v, vt, cu_k
    + ("i64",) * 4  # strides of v, vt's row
    + ("i32",) * 6  # seqlen_k ... chunks
    + ("i64",)  # items
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
        _reach(window[0]), _reach(window[1]), hopper_tiles.ORDERS.index(order),
        score_log2, softcap_in,
    )  # fmt: skip


def _batch_stride(t: Any) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0


def interval_scalars(intervals: Any, runs: Any, mask: Any) -> tuple[int, ...]:
    """The kernel's ``iv_sb, keys_sb, keys_sk, iv_ss, iv_hi, iv_full`` (zeros without intervals): for a
    block mask's ``key_intervals`` int32 (B|1, 2, Sq), one interval per row and no holes (the fully
    visible keys end at hi); for a key-padding mask, its ``key_runs`` int32 (B|1, 4) ``(lo, hi,
    full_lo, full_hi)`` (one interval per sequence; full_lo is lo) and the bool mask (B|1, 1, 1, Sk|1)
    whose bytes the sequences with holes read."""
    if intervals is not None:
        return (_batch_stride(intervals), 0, 0, intervals.stride(2), intervals.stride(1), intervals.stride(1))
    if runs is not None:
        key_stride = mask.stride(3) if mask.shape[3] > 1 else 0
        return (_batch_stride(runs), _batch_stride(mask), key_stride, 0, runs.stride(1), 3 * runs.stride(1))
    return (0,) * 6


def list_scalars(counts: Any, indices: Any, block_cols: int, block_n: int) -> tuple[int, ...]:
    """The kernel's ``bl_sb, bl_sh, bl_nk, bl_shift`` (zeros without lists): for a block-sparse mask's
    contiguous ``kv_counts`` (B|1, H|1, nQ, 2) and ``kv_indices`` (..., 2, nK), the list rows of a
    sequence and of a head (0 where broadcast), the indices per list and log2 of the kernel blocks per
    mask block."""
    if counts is None:
        return (0,) * 4
    b, h, n_q, _ = counts.shape
    return (h * n_q if b > 1 else 0, n_q if h > 1 else 0, indices.shape[-1], (block_cols // block_n).bit_length() - 1)


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


def vt_geometry(shape: tuple[int, int, int, int], variant: hopper_variants.HopperVariant) -> MapGeometry:
    """The TMA map of the pre-pass's contiguous V^T ``(batch, heads_kv, head_dim, columns)``: dims
    (columns, head_dim, heads, batch), boxes of one key block by the compiled head dim, swizzled by
    the block's row of block_n bytes."""
    b, h, d, n = shape
    return MapGeometry("u8", (n, d, h, b), (n, d * n, h * d * n), (variant.block_n, variant.head_dim, 1, 1),
                       variant.block_n)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def map_bytes(address: int, geometry: MapGeometry) -> bytes:
    """A tensor map's 128 bytes, encoded once per address (the kernel copies it by value at launch)."""
    g = geometry
    return bytes(tensor_map.encode_tiled(address, g.dtype, g.dims, g.strides, g.box, g.swizzle))


# ------------------------------------------------------------------ fp8: the V^T pre-pass


def vt_columns(seqlen_k: int, total_k: int, sequences: int, varlen: bool) -> int:
    """Columns of a row of the pre-pass's V^T: the keys in whole 32-key steps (at least one: a TMA
    dimension is never empty); varlen: each sequence from a step boundary, at most 32 columns past the
    previous one's end (vt_sequence_start in kernels/hopper_vt.cuh)."""
    if varlen:
        return 32 * (-(-total_k // 32) + sequences)
    return 32 * max(1, -(-seqlen_k // 32))


def vt_chunks(seqlen_k: int, varlen: bool) -> int:
    """The pre-pass's chunks per (sequence, KV head): they cover a sequence's usual columns, its padded
    keys and (varlen) up to a step of gap; the kernel loops over longer ones."""
    return -(-(32 * -(-seqlen_k // 32) + (32 if varlen else 0)) // VT_CHUNK)


@dataclass(frozen=True, eq=False)
class VtPrepass:
    """One problem's V^T pre-pass: V into ``shape`` = (batch (varlen: 1), heads_kv, head_dim, columns)."""

    packed: tensor_map.PackedLaunch
    grid: int
    shape: tuple[int, int, int, int]
    scalars: tuple[int, ...]  # the parameters from V's strides on
    bytes_moved: int  # global memory read (V's keys once; varlen: at most) and written (all of V^T)


def plan_vt(v: Any, varlen: bool, sequences: int, seqlen_k: int, heads_kv: int, head_dim: int,
            device: int) -> VtPrepass:  # fmt: skip
    """The pre-pass of V (a canonical (b, s, h, d) view; varlen: batch 1 of ``sequences``)."""
    columns = vt_columns(seqlen_k, v.shape[1], sequences, varlen)
    chunks = vt_chunks(seqlen_k, varlen)
    items = sequences * heads_kv * chunks
    scalars = (*v.stride()[:3], columns, seqlen_k, v.shape[1], heads_kv, head_dim, sequences, chunks, items)
    shape = (1 if varlen else sequences, heads_kv, head_dim, columns)
    grid = min(items, VT_BLOCKS_PER_SM * _sm_count(device))
    keys = v.shape[1] if varlen else sequences * min(seqlen_k, v.shape[1])
    moved = keys * heads_kv * head_dim + math.prod(shape)
    return VtPrepass(tensor_map.packed_launch(vt_kernel(device), VT_PARAMETERS), grid, shape, scalars, moved)


def transpose_v_into(prepass: VtPrepass, v: Any, cu_k: Any, vt: Any, device: int) -> None:
    """Fill ``vt`` (``prepass.shape``, contiguous) with V^T on torch's current stream: every column,
    zeros past each sequence's keys."""
    values = (v.data_ptr(), vt.data_ptr(), 0 if cu_k is None else cu_k.data_ptr(), *prepass.scalars)
    on_current_stream(prepass.packed, device, prepass.grid, VT_THREADS, 0, values)


# ------------------------------------------------------------------ the forward


@dataclass(frozen=True, eq=False)
class Launch:
    """What one problem's launches share, decided on its first call: the kernel and its parameter
    packing, the grid, the tensor maps' geometry and every parameter that is not an address; fp8:
    the V^T pre-pass (None for 16-bit inputs: the kernel reads V itself)."""

    packed: tensor_map.PackedLaunch
    grid: int
    threads: int
    smem: int
    maps: tuple[MapGeometry, MapGeometry, MapGeometry]
    scalars: tuple[int | float, ...]
    descale_strides: tuple[int, ...]
    interval_scalars: tuple[int, ...]
    list_scalars: tuple[int, ...]
    prepass: VtPrepass | None


#: Launches by problem key (:func:`forward`); cleared when full (a key holds shapes, not tensors).
_launches: dict[tuple, Launch | None] = {}
MAX_LAUNCHES = 1024


def _plan_launch(
    q: Any, k: Any, v: Any, out: Any, lse: Any, cu_q: Any, *, seqlen_q: int, seqlen_k: int, heads_q: int,
    heads_kv: int, head_dim: int, window: tuple[int, int], softcap: float, scale: float,
    config: hopper_tiles.HopperConfig | None, descales: tuple[Any, Any, Any], intervals: tuple[Any, Any, Any],
    lists: tuple[Any, Any, Any], device: int,
) -> Launch | None:  # fmt: skip
    """The :class:`Launch` of a problem (None: no tiles, nothing to launch)."""
    varlen = cu_q is not None
    dtype = input_name(q.dtype)
    assert dtype is not None, q.dtype  # unsupported_reasons said so
    fp8 = dtype in hopper_variants.FP8_INPUTS
    has_intervals = intervals[0] is not None or intervals[1] is not None
    has_lists = lists[0] is not None
    config = config or hopper_tiles.config_for(head_dim, window, seqlen_k, fp8, has_intervals, has_lists)
    out_dtype = (input_name(out.dtype) or "") if fp8 else ""
    variant = _variant(config, head_dim, dtype, hopper_tiles.mask_kind(window, has_intervals, has_lists), out_dtype)
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    m_blocks = -(-seqlen_q // variant.block_m)
    tiles = m_blocks * heads_q * batch
    if tiles == 0:
        return None
    grid = min(tiles, _sm_count(device))
    if intervals[1] is not None:
        # A key-padding mask's tiles differ only by their sequence's key count: head by head (K and V
        # shared in L2) beat longest-first, 0.289 vs 0.359 ms (H200, 2026-12-02, b8 s2k d128 bf16, lengths
        # 512-2048); block masks' intervals keep the table's order (documents: blocks 2.5% faster).
        config = dataclasses.replace(config, order="heads")
    order = hopper_tiles.tile_order(
        config, m_blocks=m_blocks, pairs=tiles // m_blocks, grid=grid, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        window=window, varlen=varlen,
    )  # fmt: skip
    scalars = scalar_arguments(
        tuple(out.stride()), tuple(lse.stride()), varlen=varlen, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        total_q=q.shape[1], total_k=k.shape[1], heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
        m_blocks=m_blocks, tiles=tiles, window=window, order=order, softcap=softcap, scale=scale,
    )  # fmt: skip
    moved = "u8" if variant.fp8 else variant.dtype  # TMA moves fp8 as bytes
    prepass = None
    if fp8:
        prepass = plan_vt(v, varlen, batch, seqlen_k, heads_kv, head_dim, device)
        v_map = vt_geometry(prepass.shape, variant)
    else:
        v_map = geometry(v, variant.block_n, moved, variant.slab, variant.swizzle, varlen)
    maps = (
        geometry(q, variant.block_m, moved, variant.slab, variant.swizzle, varlen),
        geometry(k, variant.block_n, moved, variant.slab, variant.swizzle, varlen),
        v_map,
    )
    packed = tensor_map.packed_launch(kernel(variant, device), PARAMETERS)
    strides = tuple(s for d in descales for s in _descale_strides(d))
    return Launch(packed, grid, variant.threads, variant.launch_smem, maps, scalars, strides,
                  interval_scalars(*intervals), list_scalars(*lists[:2], (lists[2] or (0, 0))[1], variant.block_n),
                  prepass)  # fmt: skip


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
    config: hopper_tiles.HopperConfig | None = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    key_intervals: Any = None,
    key_runs: Any = None,
    key_mask: Any = None,
    kv_counts: Any = None,
    kv_indices: Any = None,
    block_size: tuple[int, int] | None = None,
) -> None:
    """Fill ``out`` (the inputs' dtype; bf16 or fp16 for fp8 inputs) and ``lse`` (float32) with one
    launch on torch's current stream. fp8 inputs: the values are ``q * q_descale`` and so on (float32
    descale factors, one value or one per (batch, head); None: 1); a pre-pass launched first writes V^T
    into a buffer of torch's caching allocator (:class:`VtPrepass`).

    ``q, k, v, out``: canonical ``(batch, seqlen, heads, head_dim)`` views, any strides TMA takes
    (:func:`unsupported_reasons`); varlen: batch 1, seqlen = total tokens, int32 ``cu_seqlens_*``
    of the sequences' offsets and ``seqlen_q/k`` their maxima. ``lse``: ``(batch, heads_q, seqlen_q)``
    (varlen ``(1, heads_q, total_q)``). ``window = (left, right)``, -1 unbounded (causal: (-1, 0)).
    Each query row may also see only an interval of keys (16-bit inputs, any window; not varlen):
    ``key_intervals``, int32 (batch|1, 2, seqlen_q), row i sees keys [lo_i, hi_i), neither end moving
    left as i grows (:attr:`flash.BlockMask.key_intervals`); or a key-padding mask ``key_mask``, bool
    (batch|1, 1, 1, seqlen_k|1), with its ``key_runs`` (:func:`flash.masking.key_runs`).
    Or the tiles walk a block-sparse mask's forward lists (16-bit inputs, no window; not varlen):
    ``kv_counts`` int32 (batch|1, heads_q|1, query blocks, 2) and ``kv_indices`` (..., 2, key blocks)
    (:attr:`flash.BlockMask.lists`) of ``block_size`` blocks; every listed block is computed unmasked
    but for the keys past seqlen_k, so the caller passes only masks with no block partial inside the
    sequences (:attr:`flash.block_mask.BlockMaskInfo.partial`).
    No host synchronisation and no allocation but fp8's V^T: CUDA-graph capturable.

    The host path is the per-call cost of small problems (decoding): everything but the addresses is
    decided once per problem (:class:`Launch`), tensor maps are encoded once per address.
    """

    device = q.get_device()
    window = (window[0], window[1])  # hashable, whatever sequence came in
    descales = (q_descale, k_descale, v_descale)
    intervals = (key_intervals, key_runs, key_mask)
    lists = (kv_counts, kv_indices, block_size)
    cu_q = None if cu_seqlens_q is None else cu_seqlens_q.contiguous()
    cu_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
    key = (
        q.dtype, out.dtype, q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), lse.stride(),
        None if cu_q is None else cu_q.shape, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window,
        softcap, scale, config, device,
        *[None if d is None else (d.shape, d.stride()) for d in (*descales, *intervals, *lists[:2])], block_size,
    )  # fmt: skip
    try:
        launch = _launches[key]
    except KeyError:
        if len(_launches) >= MAX_LAUNCHES:
            _launches.clear()
        launch = _launches[key] = _plan_launch(
            q, k, v, out, lse, cu_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=heads_q, heads_kv=heads_kv,
            head_dim=head_dim, window=window, softcap=softcap, scale=scale, config=config,
            descales=descales, intervals=intervals, lists=lists, device=device,
        )  # fmt: skip
    if launch is None:
        return
    v_address = v.data_ptr()
    if launch.prepass is not None:
        import torch

        vt = torch.empty(launch.prepass.shape, dtype=v.dtype, device=v.device)  # lives until both are enqueued
        transpose_v_into(launch.prepass, v, cu_k, vt, device)
        v_address = vt.data_ptr()
    gq, gk, gv = launch.maps
    values = (
        map_bytes(q.data_ptr(), gq), map_bytes(k.data_ptr(), gk), map_bytes(v_address, gv),
        out.data_ptr(), lse.data_ptr(), 0 if cu_q is None else cu_q.data_ptr(), 0 if cu_k is None else cu_k.data_ptr(),
        *launch.scalars, *[0 if d is None else d.data_ptr() for d in descales], *launch.descale_strides,
        *[0 if t is None else t.data_ptr() for t in (key_intervals if key_intervals is not None else key_runs,
                                                     key_mask)],
        *launch.interval_scalars, *[0 if t is None else t.data_ptr() for t in lists[:2]], *launch.list_scalars,
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
