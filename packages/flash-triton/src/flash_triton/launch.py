"""Host side of the kernels: arguments, grids, descriptors, and a safety net for configurations.

Everything here runs per call, so it stays cheap: strides and scalars are read off the spec and
the canonical views (no copies), descriptors are small host objects, and the kernels are
imported once (:func:`flash_triton.runtime.kernels`).

The configuration (block sizes, warps, stages, TMA) comes from the plan (the backend's
heuristics table, or autotuning) through the caller. If a configuration fails to compile on this
GPU and Triton version (out of shared memory, a Hopper feature the compiler rejects), the next
simpler one on a fixed ladder is tried, the one that works is remembered for the process, and a
warning says so; a configuration that never compiles raises the first error. ``FLASH_TRITON_NO_FALLBACK=1``
turns the ladder off (for tuning, which must time exactly the configuration it names).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from flash import dropout
from flash.backend import BackwardArgs, ForwardArgs, MaskTensors
from flash.heuristics import KernelConfig
from flash.spec import UNBOUNDED, AttentionSpec
from flash_triton import replay, runtime, tma
from flash_triton.mask_args import MaskArgs, Walk, checks_values, fit_tiling, mask_args, tile_guard, values_finite

LOG2E = math.log2(math.e)
PREPROCESS_BLOCK_M = 64


def padded_head_dim(head_dim: int) -> int:
    """The head dim kernels tile with: the next power of two, at least 16 (what ``tl.dot`` needs)."""
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclass(frozen=True)
class Tiling:
    """What one kernel launch compiles for: tile shape, warps, pipeline depth, Hopper features."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


def ladder(first: Tiling) -> list[Tiling]:
    """``first``, then progressively simpler tilings to fall back on if it does not compile."""
    out = [first]

    def add(t: Tiling) -> None:
        if t not in out:
            out.append(t)

    add(replace(out[-1], tma=False))
    while out[-1].num_stages > 1:
        add(replace(out[-1], num_stages=out[-1].num_stages - 1))
    while out[-1].block_n > 16:
        add(replace(out[-1], block_n=out[-1].block_n // 2, num_stages=2))
    while out[-1].block_m > 16:
        add(replace(out[-1], block_m=out[-1].block_m // 2, num_warps=4))
    return out


_working: dict[tuple, Tiling] = {}
_lock = threading.Lock()


def launch_with_fallback(key: tuple, first: Tiling, launch: Callable[[Tiling], None]) -> Tiling:
    """Run ``launch`` with the remembered tiling for ``key``, else walk :func:`ladder` from ``first``."""
    known = _working.get((key, first))
    if known is not None:
        launch(known)
        return known
    first_error: Exception | None = None
    strict = os.environ.get("FLASH_TRITON_NO_FALLBACK", "") == "1"  # tuning: measure exactly what was asked
    for candidate in [first] if strict else ladder(first):
        try:
            launch(candidate)
        except Exception as error:  # compilation or resource failure of this candidate
            if runtime.interpreting() or (
                isinstance(error, (TypeError, NameError, AttributeError)) and not _is_triton_error(error)
            ):
                raise  # the interpreter compiles nothing; a launcher bug is no configuration problem
            first_error = first_error or error
            continue
        with _lock:
            _working[(key, first)] = candidate
        if candidate != first:
            warnings.warn(
                f"flash-triton: configuration {first} failed to compile ({type(first_error).__name__}: "
                f"{str(first_error).splitlines()[0][:200] if str(first_error) else ''}); using {candidate}",
                RuntimeWarning,
                stacklevel=4,
            )
        return candidate
    assert first_error is not None
    raise first_error


def _is_triton_error(error: Exception) -> bool:
    return type(error).__module__.startswith("triton")


# ----------------------------------------------------------------------------- shared arguments


@dataclass(frozen=True)
class Problem:
    """Scalars and flags of a spec, as the kernels take them."""

    head_dim: int
    d_pad: int
    varlen: bool
    has_left: bool
    has_right: bool
    left: int
    right: int
    scale: float
    scale_log2: float
    softcap: bool
    softcap_scale: float
    softcap_log2: float
    dropout: bool
    seed_lo: int
    seed_hi: int
    threshold: int
    drop_scale: float
    reverse: bool


def _int32(value: int) -> int:
    """A uint32 bit pattern as the int32 with the same bits (so Triton passes it as i32)."""
    return value - (1 << 32) if value >= (1 << 31) else value


def pack_left(left: int, sink_tokens: int) -> int:
    """The left reach with the sink-token count in its high 32 bits (:mod:`flash_triton.tiles` unpacks it)."""
    return left | (sink_tokens << 32)


def problem(spec: AttentionSpec) -> Problem:
    left, right = spec.mask_bounds
    seed = spec.dropout_seed
    return Problem(
        head_dim=spec.head_dim,
        d_pad=padded_head_dim(spec.head_dim),
        varlen=spec.varlen,
        has_left=left != UNBOUNDED,
        has_right=right != UNBOUNDED,
        left=pack_left(max(left, 0), spec.sink_tokens),
        right=max(right, 0),
        scale=spec.scale,
        scale_log2=spec.scale * LOG2E,
        softcap=spec.softcap > 0,
        softcap_scale=spec.scale / spec.softcap if spec.softcap else 0.0,
        softcap_log2=spec.softcap * LOG2E,
        dropout=spec.dropout_p > 0,
        seed_lo=_int32(seed & 0xFFFFFFFF),
        seed_hi=_int32((seed >> 32) & 0xFFFFFFFF),
        threshold=dropout.threshold(spec.dropout_p) if spec.dropout_p else 0,
        drop_scale=1.0 / (1.0 - spec.dropout_p),
        reverse=spec.masked,
    )


def strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a canonical (B, S, H, D) view; batch stride 0 for varlen."""
    sb, ss, sh, _ = t.stride()
    return (0 if varlen else sb), ss, sh


def lse_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    sb, sh, ss = t.stride()
    return (0 if varlen else sb), sh, ss


def _tma_map(spec: AttentionSpec, p: Problem, t: torch.Tensor, block_rows: int) -> tma.RowMap | None:
    """The descriptor row map of ``t`` if TMA can read its (block_rows, head_dim) tiles, else None."""
    if p.head_dim != p.d_pad or not (t.is_cuda or runtime.interpreting()):
        return None
    mapping = tma.row_map(t, p.head_dim, p.d_pad, spec.batch, spec.varlen)
    if mapping is None or mapping.rows < block_rows:
        return None
    return mapping


def _desc(t: torch.Tensor, mapping: tma.RowMap | None, block_rows: int, p: Problem) -> tuple[Any, int, int, int]:
    if mapping is None:
        return None, 0, 0, 0
    return tma.descriptor(t, mapping, block_rows, p.d_pad), mapping.rb, mapping.rh, mapping.ch


def _options(t: Tiling) -> dict[str, int]:
    return {"num_warps": t.num_warps, "num_stages": t.num_stages}


# ----------------------------------------------------------------------------- forward


def forward_tiling(config: KernelConfig) -> Tiling:
    return Tiling(
        config.block_m,
        config.block_n,
        config.num_warps,
        config.num_stages,
        tma=bool(config.option("tma", False)),
    )


def _translate(spec: AttentionSpec, fn: Any, argument: str) -> Any:
    """A user function as a Triton device function (None stays None)."""
    return None if fn is None else runtime.kernels().mods.translated(fn, argument, spec.device)


def _masks(spec: AttentionSpec, masks: Any, t: Tiling, walk: Walk, dummy: torch.Tensor) -> MaskArgs:
    return mask_args(spec, masks, t, walk, dummy, lambda fn, argument: _translate(spec, fn, argument))


def _key(pass_: str, spec: AttentionSpec, p: Problem, m: MaskArgs) -> tuple:
    flags = tuple(
        sorted((name, value if isinstance(value, (int, bool)) else id(value)) for name, value in m.flags.items())
    )
    return (pass_, spec.dtype, spec.out_dtype, p.head_dim, p.varlen, p.has_left, p.has_right, p.softcap, p.dropout,
            spec.device.type, flags)  # fmt: skip


def _replayable(spec: AttentionSpec, masks: MaskTensors | None) -> bool:
    """Whether a call may replay recorded launches: not with mask tensors (their block lists are made per
    call), nor with dropout (each call's seed is a new spec, so a recording would never be used again)."""
    return masks is None and not spec.dropout_p and replay.enabled()


def forward(spec: AttentionSpec, args: ForwardArgs, config: KernelConfig) -> Tiling:
    """Fill ``args.out`` and ``args.lse``. Returns the tiling that ran."""
    tensors: replay.Tensors = (args.q, args.k, args.v, args.out, args.lse, args.cu_seqlens_q, args.cu_seqlens_k)
    tensors += (args.sinks, args.q_descale, args.k_descale, args.v_descale)
    key = replay.signature("forward", (spec, config), tensors) if _replayable(spec, args.masks) else None
    recorded = replay.find(key)
    if recorded is not None:
        tiling: Tiling = replay.replay(recorded, tensors)
        return tiling
    recorder = replay.Recorder(key, tensors)
    tiling = _forward(spec, args, config, recorder)
    recorder.keep((spec, config), tiling)
    return tiling


def _forward(spec: AttentionSpec, args: ForwardArgs, config: KernelConfig, recorder: replay.Recorder) -> Tiling:
    kern = runtime.kernels().forward
    p = problem(spec)
    q, k, v, out, lse = args.q, args.k, args.v, args.out, args.lse
    if spec.seqlen_q == 0:  # only possible with an inconsistent max_seqlen_q: nothing a kernel could cover
        out.zero_()
        lse.fill_(float("-inf"))
        return forward_tiling(config)
    first = fit_tiling(forward_tiling(config), spec, args.masks, "keys")
    masks = _masks(spec, args.masks, first, "keys", lse)
    descales, descale_strides = _descales(spec, args)
    checked, guard = checks_values(spec, args.masks), tile_guard(spec)
    finite = values_finite(v) if checked else lse

    def launch(t: Tiling) -> None:
        m = masks if t == first else _masks(spec, args.masks, t, "keys", lse)
        k_map = _tma_map(spec, p, k, t.block_n) if t.tma else None
        v_map = _tma_map(spec, p, v, t.block_n) if t.tma else None
        use_tma = k_map is not None and v_map is not None
        k_desc, *k_rc = _desc(k, k_map if use_tma else None, t.block_n, p)
        v_desc, *v_rc = _desc(v, v_map if use_tma else None, t.block_n, p)
        grid = (triton_cdiv(spec.seqlen_q, t.block_m), spec.heads_q, spec.batch)
        recorder.run(
            kern.attention_forward_kernel, grid,
            q, k, v, out, lse, args.cu_seqlens_q, args.cu_seqlens_k, k_desc, v_desc, *m.pointers(), args.sinks,
            *descales, finite, strides3(q, p.varlen), strides3(k, p.varlen), strides3(v, p.varlen),
            strides3(out, p.varlen), lse_strides(lse, p.varlen), *m.strides(), descale_strides,
            spec.seqlen_q, spec.seqlen_k, spec.total_q, spec.total_k, spec.group_size, tuple(k_rc), tuple(v_rc),
            p.scale_log2, p.softcap_scale, p.softcap_log2, p.left, p.right,
            p.seed_lo, p.seed_hi, p.threshold, p.drop_scale,
            HEAD_DIM=p.head_dim, D_PAD=p.d_pad, BLOCK_M=t.block_m, BLOCK_N=t.block_n, VARLEN=p.varlen,
            HAS_LEFT=p.has_left, HAS_RIGHT=p.has_right, SOFTCAP=p.softcap, DROPOUT=p.dropout, TMA=use_tma,
            REVERSE=p.reverse, SINKS=args.sinks is not None, DESCALE=spec.is_fp8, V_CHECKED=checked,
            TILE_GUARD=guard, **m.flags, **_options(t),
        )  # fmt: skip

    return launch_with_fallback((*_key("forward", spec, p, masks), checked, guard), first, launch)


def _descales(spec: AttentionSpec, args: ForwardArgs) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """The fp8 descale factors the forward kernel reads (a missing one is a stored 1.0) and their
    (batch, head) strides, q's, k's, v's: 0, 0 for one factor per tensor."""
    given = (args.q_descale, args.k_descale, args.v_descale)
    if not spec.is_fp8:
        return given, (0,) * 6
    factors = tuple(_unit(args.q.device) if d is None else d for d in given)
    return factors, tuple(s for d in factors for s in descale_strides(d))


def descale_strides(d: torch.Tensor | None) -> tuple[int, int]:
    """(sequence, head) strides of fp8 descale factors: one per tensor (shape () or (1,)), per head
    (heads,) or per (batch, head); 0 along an axis the factors do not vary on (and for none)."""
    if d is None or d.numel() == 1:
        return 0, 0
    if d.dim() == 1:
        return 0, d.stride(0)
    return d.stride(0), d.stride(1)


@functools.lru_cache(maxsize=8)
def _unit(device: torch.device) -> torch.Tensor:
    """A float32 1.0 on ``device`` that lives as long as the process (CUDA graphs may capture it)."""
    return torch.ones((), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- backward


def backward_tilings(config: KernelConfig) -> tuple[Tiling, Tiling]:
    """(dK/dV kernel tiling, dQ kernel tiling) of a backward configuration."""
    use_tma = bool(config.option("tma", False))
    dkdv = Tiling(config.block_m, config.block_n, config.num_warps, config.num_stages, tma=use_tma)
    dq = Tiling(
        int(config.option("dq_block_m", config.block_n)),
        int(config.option("dq_block_n", config.block_m)),
        int(config.option("dq_num_warps", config.num_warps)),
        int(config.option("dq_num_stages", config.num_stages)),
        tma=bool(config.option("dq_tma", use_tma)),
    )
    return dkdv, dq


def backward(spec: AttentionSpec, args: BackwardArgs, config: KernelConfig) -> tuple[Tiling, Tiling]:
    """Fill ``args.dq``, ``args.dk``, ``args.dv`` (and ``args.dbias``). Returns the tilings that ran."""
    if spec.seqlen_q == 0 or spec.seqlen_k == 0:
        args.dq.zero_()
        args.dk.zero_()
        args.dv.zero_()
        return backward_tilings(config)
    # Per-row buffers of the preprocessing kernel: delta = rowsum(dO * O), and the LSE in base 2.
    rows = spec.total_q if spec.varlen else spec.seqlen_q
    delta = torch.empty(
        (1 if spec.varlen else spec.batch, spec.heads_q, rows), dtype=torch.float32, device=args.q.device
    )
    lse2 = torch.empty_like(delta)
    tensors: replay.Tensors = (args.q, args.k, args.v, args.out, args.dout, args.lse, args.dq, args.dk, args.dv)
    tensors += (args.cu_seqlens_q, args.cu_seqlens_k, args.dbias, delta, lse2)
    key = replay.signature("backward", (spec, config), tensors) if _replayable(spec, args.masks) else None
    recorded = replay.find(key)
    if recorded is not None:
        tilings: tuple[Tiling, Tiling] = replay.replay(recorded, tensors)
        return tilings
    recorder = replay.Recorder(key, tensors)
    tilings = _backward(spec, args, config, delta, lse2, recorder)
    recorder.keep((spec, config), tilings)
    return tilings


def _backward(
    spec: AttentionSpec,
    args: BackwardArgs,
    config: KernelConfig,
    delta: torch.Tensor,
    lse2: torch.Tensor,
    recorder: replay.Recorder,
) -> tuple[Tiling, Tiling]:
    kern = runtime.kernels().backward
    p = problem(spec)
    q, k, v, out, dout, lse = args.q, args.k, args.v, args.out, args.dout, args.lse
    dq, dk, dv = args.dq, args.dk, args.dv
    dkdv_first, dq_first = backward_tilings(config)
    buf_strides = lse_strides(delta, p.varlen)

    grid = (triton_cdiv(spec.seqlen_q, PREPROCESS_BLOCK_M), spec.heads_q, spec.batch)
    recorder.run(
        kern.attention_backward_preprocess_kernel, grid, out, dout, lse, delta, lse2, args.cu_seqlens_q,
        *strides3(out, p.varlen), *strides3(dout, p.varlen), *lse_strides(lse, p.varlen), *buf_strides,
        spec.seqlen_q, spec.total_q,
        HEAD_DIM=p.head_dim, D_PAD=p.d_pad, BLOCK_M=PREPROCESS_BLOCK_M, VARLEN=p.varlen, num_warps=4,
    )  # fmt: skip

    dkdv_first = fit_tiling(dkdv_first, spec, args.masks, "queries")
    dq_first = fit_tiling(dq_first, spec, args.masks, "keys")
    common = (
        p.scale, p.scale_log2, p.softcap_scale, p.softcap_log2, p.left, p.right,
        p.seed_lo, p.seed_hi, p.threshold, p.drop_scale,
    )  # fmt: skip
    flags = dict(
        HEAD_DIM=p.head_dim, D_PAD=p.d_pad, VARLEN=p.varlen, HAS_LEFT=p.has_left, HAS_RIGHT=p.has_right,
        SOFTCAP=p.softcap, DROPOUT=p.dropout, SCORE_MOD_GRAD=_translate(spec, spec.score_mod_grad, "score_mod_grad"),
    )  # fmt: skip
    dbias = args.dbias if args.dbias is not None else lse2
    db_str = tuple(dbias.stride()) if args.dbias is not None else (0, 0, 0, 0)
    made: dict[tuple[Tiling, Walk], MaskArgs] = {}

    def masks_for(t: Tiling, walk: Walk) -> MaskArgs:
        """The mask arguments of a launch, summarised once per tiling (block lists, key runs)."""
        if (t, walk) not in made:
            made[(t, walk)] = _masks(spec, args.masks, t, walk, lse2)
        return made[(t, walk)]

    def launch_dkdv(t: Tiling) -> None:
        m = masks_for(t, "queries")
        q_map = _tma_map(spec, p, q, t.block_m) if t.tma else None
        do_map = _tma_map(spec, p, dout, t.block_m) if t.tma else None
        use_tma = q_map is not None and do_map is not None
        q_desc, *q_rc = _desc(q, q_map if use_tma else None, t.block_m, p)
        do_desc, *do_rc = _desc(dout, do_map if use_tma else None, t.block_m, p)
        grid = (triton_cdiv(spec.seqlen_k, t.block_n), spec.heads_kv, spec.batch)
        recorder.run(
            kern.attention_backward_dkdv_kernel, grid,
            q, k, v, dout, dk, dv, dbias, lse2, delta, args.cu_seqlens_q, args.cu_seqlens_k, q_desc, do_desc,
            *m.pointers(), strides3(q, p.varlen), strides3(k, p.varlen), strides3(v, p.varlen),
            strides3(dout, p.varlen), strides3(dk, p.varlen), strides3(dv, p.varlen), db_str, buf_strides,
            *m.strides(), spec.seqlen_q, spec.seqlen_k, spec.total_q, spec.total_k, spec.group_size,
            tuple(q_rc), tuple(do_rc), *common,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, TMA=use_tma, BIAS_GRAD=args.dbias is not None, **m.flags, **flags,
            **_options(t),
        )  # fmt: skip

    def launch_dq(t: Tiling) -> None:
        m = masks_for(t, "keys")
        k_map = _tma_map(spec, p, k, t.block_n) if t.tma else None
        v_map = _tma_map(spec, p, v, t.block_n) if t.tma else None
        use_tma = k_map is not None and v_map is not None
        k_desc, *k_rc = _desc(k, k_map if use_tma else None, t.block_n, p)
        v_desc, *v_rc = _desc(v, v_map if use_tma else None, t.block_n, p)
        grid = (triton_cdiv(spec.seqlen_q, t.block_m), spec.heads_q, spec.batch)
        recorder.run(
            kern.attention_backward_dq_kernel, grid,
            q, k, v, dout, dq, lse2, delta, args.cu_seqlens_q, args.cu_seqlens_k, k_desc, v_desc, *m.pointers(),
            strides3(q, p.varlen), strides3(k, p.varlen), strides3(v, p.varlen), strides3(dout, p.varlen),
            strides3(dq, p.varlen), buf_strides, *m.strides(),
            spec.seqlen_q, spec.seqlen_k, spec.total_q, spec.total_k, spec.group_size, tuple(k_rc), tuple(v_rc),
            *common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, TMA=use_tma, REVERSE=p.reverse, **m.flags, **flags,
            **_options(t),
        )  # fmt: skip

    probe = masks_for(dkdv_first, "queries")
    key = _key("backward", spec, p, probe)
    ran_dkdv = launch_with_fallback((*key, "dkdv", args.dbias is not None), dkdv_first, launch_dkdv)
    ran_dq = launch_with_fallback((*key, "dq"), dq_first, launch_dq)
    return ran_dkdv, ran_dq


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
