"""The ``cuda`` backend: what it supports, the forward and the backward launches.

Forward, two kernels: on Hopper (sm_90) the wgmma/TMA kernel of :mod:`flash_cuda.hopper`, with its
own tile table (:mod:`flash_cuda.hopper_tiles`); elsewhere, and for problems the Hopper kernel
declines (layouts TMA cannot read), the mma.sync kernel of :mod:`flash_cuda.launch`, whose tiles come
from ``heuristics.json``.

Backward (issue 14): on Hopper only, the wgmma/TMA kernel of :mod:`flash_cuda.hopper_bwd` for what
:data:`BACKWARD` declares (fp16/bf16, head dims up to 128, causal/window, GQA, varlen, softcap, deterministic,
key-padding masks and key intervals, ALiBi with a right reach of 0);
everything else is declined with a reason and dispatch pairs the forward with another backend's
backward (LSE contract).

Registered through the ``flash.backends`` entry point ``cuda = "flash_cuda.backend:CudaBackend"``.
Importing this module imports neither CuPy nor NVRTC: :meth:`CudaBackend.unavailable_reasons`
does, once, the first time dispatch asks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from flash import heuristics
from flash.backend import Backend, BackwardArgs, ForwardArgs, Limits, Pass, Support
from flash.masking import key_runs, made_once
from flash.spec import AttentionSpec
from flash_cuda import hopper, hopper_bwd, launch
from flash_cuda._version import __version__
from flash_cuda.candidates import CANDIDATES
from flash_cuda.variants import Variant, make_variant, mask_kind, nvrtc_arch, smem_row

#: Options of the spec this forward handles (dropout is not implemented; softcap, fp8, key-padding masks,
#: block masks with key intervals and block masks without partial blocks only by the Hopper kernel, see
#: CudaBackend.extra_reasons).
FORWARD = Support(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}),
    features=frozenset(
        {"causal", "window", "gqa", "varlen", "deterministic", "softcap", "fp8", "out_dtype"}
        | {"key_padding", "key_intervals", "block_sparse"}
    ),
    head_dims=range(8, 257, 8),  # rows move in 16-byte chunks
    min_capability=(8, 0),  # cp.async and bf16 mma.sync
    aligned16=True,
    limits=Limits(tokens=launch.MAX_SEQLEN),  # 32-bit index arithmetic
)


#: What the Hopper backward (flash_cuda.hopper_bwd, sm_90 only: CudaBackend.extra_reasons) runs
#: (deterministic: dQ's reductions in a fixed order of the key blocks; not with varlen, a reason
#: from hopper_bwd.problem_reasons). Not declared, so dispatch sends them to another backend's
#: backward (the LSE contract): dropout, head dims above 128, masks beyond causal/window other than a
#: key-padding mask and key intervals, score terms other than ALiBi. ALiBi only with causal or a window
#: of right reach 0, and without varlen, softcap, deterministic or another mask (reasons from
#: hopper_bwd.problem_reasons).
BACKWARD = Support(
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    features=frozenset(
        {"causal", "window", "gqa", "varlen", "softcap", "deterministic", "key_padding", "key_intervals", "alibi"}
    ),
    head_dims=range(8, hopper_bwd.HEAD_DIMS[-1] + 1, 8),
    min_capability=(9, 0),
    aligned16=True,
    limits=Limits(tokens=hopper.MAX_SEQLEN),
)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CudaBackend(Backend):
    """Raw CUDA C++ FlashAttention forward (mma.sync tensor cores), compiled at run time by NVRTC via CuPy."""

    name = "cuda"
    version = __version__
    priority = 80
    forward_support = FORWARD

    def unavailable_reasons(self) -> list[str]:
        try:
            import cupy
        except Exception as error:  # ImportError, or a CuPy that cannot find its CUDA libraries
            return [
                f"cupy not importable ({type(error).__name__}: {error}); "
                "install flash-cuda[cuda12] or flash-cuda[cuda13]"
            ]
        if not torch.cuda.is_available():
            return ["no CUDA GPU"]
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as error:
            return [f"cupy cannot use the CUDA driver ({type(error).__name__}: {error})"]
        capabilities = [_capability(i) for i in range(torch.cuda.device_count())]
        if all(c < (8, 0) for c in capabilities):
            found = ", ".join(f"sm_{a}{b}" for a, b in capabilities)
            return [f"GPU too old ({found}): the kernel needs sm_80 or newer (cp.async, bf16 mma.sync)"]
        return []

    backward_support = BACKWARD

    def extra_reasons(self, spec: AttentionSpec, pass_: Pass) -> list[str]:
        if pass_ == "backward":
            return _backward_reasons(spec)
        if pass_ != "forward" or spec.device.type != "cuda":
            return []
        return _forward_reasons(spec)

    def heuristics_rows(self) -> list[dict[str, Any]]:
        return heuristics.rows_from_json("flash_cuda", "heuristics.json")

    def shared_memory_row(self, head_dim: int) -> int:
        return smem_row(head_dim)

    def runtime_versions(self) -> str:
        import cupy

        return f"cupy {cupy.__version__}; CUDA driver {cupy.cuda.runtime.driverGetVersion()}"

    def tuning_candidates(self, spec: AttentionSpec, pass_: Pass) -> list[heuristics.KernelConfig]:
        """The mma.sync forward's spill-free tiles of the head-dim bucket (FLASH_AUTOTUNE=1). None for
        the Hopper kernels: they take their tiles from their own tables, not from a configuration, so
        timing candidates would time one kernel several times."""
        if pass_ != "forward" or self.uses_hopper(spec):
            return []
        return list(CANDIDATES.get(heuristics.head_dim_bucket(spec.head_dim), []))

    def variant(self, spec: AttentionSpec, config: heuristics.KernelConfig) -> Variant:
        """The kernel variant that runs ``spec`` with ``config``, fitted to this GPU's shared memory."""
        index = _index(spec.device)
        mask = mask_kind(spec.mask_bounds, spec.masked)
        return _variant(config, spec.head_dim, spec.dtype == torch.bfloat16, mask, index)

    def uses_hopper(self, spec: AttentionSpec) -> bool:
        """Whether the Hopper kernel runs ``spec`` (else the mma.sync kernel does)."""
        return not _hopper_reasons(spec)

    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: heuristics.KernelConfig) -> None:
        if not _hopper_reasons(spec):
            hopper.forward(
                args.q, args.k, args.v, args.out, args.lse, cu_seqlens_q=args.cu_seqlens_q,
                cu_seqlens_k=args.cu_seqlens_k, seqlen_q=spec.seqlen_q, seqlen_k=spec.seqlen_k,
                heads_q=spec.heads_q, heads_kv=spec.heads_kv, head_dim=spec.head_dim, window=spec.mask_bounds,
                softcap=spec.softcap, scale=spec.scale, q_descale=args.q_descale, k_descale=args.k_descale,
                v_descale=args.v_descale, **_interval_tensors(spec, args), **_list_tensors(spec, args),
            )  # fmt: skip
            return
        launch.forward(spec, args, self.variant(spec, config))

    def backward(self, spec: AttentionSpec, args: BackwardArgs, config: heuristics.KernelConfig) -> None:
        longest = (spec.seqlen_q, spec.seqlen_k) if spec.varlen else (None, None)
        hopper_bwd.backward(
            args.q, args.k, args.v, args.out, args.lse, args.dout, args.dq, args.dk, args.dv, heads_q=spec.heads_q,
            heads_kv=spec.heads_kv, head_dim=spec.head_dim, window=spec.mask_bounds, scale=spec.scale,
            cu_seqlens_q=args.cu_seqlens_q, cu_seqlens_k=args.cu_seqlens_k, max_seqlen_q=longest[0],
            max_seqlen_k=longest[1], softcap=spec.softcap, deterministic=spec.deterministic,
            key_padding=args.masks.attn_mask if spec.key_padding and args.masks else None,
            key_intervals=args.masks.block_mask.key_intervals if args.masks and args.masks.block_mask else None,
            alibi_slopes=args.masks.alibi_slopes if args.masks else None,
        )  # fmt: skip


def _has_intervals(spec: AttentionSpec) -> bool:
    """Whether each query row sees an interval of keys: a key-padding mask, a block mask's key_intervals."""
    return spec.key_padding or (spec.block_mask is not None and spec.block_mask.intervals)


def _interval_tensors(spec: AttentionSpec, args: ForwardArgs) -> dict[str, Any]:
    """The Hopper forward's interval arguments of the call (none without such a mask)."""
    masks = args.masks
    if masks is None:
        return {}
    if masks.block_mask is not None and masks.block_mask.key_intervals is not None:
        return {"key_intervals": masks.block_mask.key_intervals}
    if spec.key_padding and masks.attn_mask is not None:
        return {"key_runs": made_once(key_runs, masks.attn_mask, spec.seqlen_k), "key_mask": masks.attn_mask}
    return {}


def _sparse_blocks(spec: AttentionSpec) -> tuple[int, int] | None:
    """The block size of a block mask whose lists the Hopper forward walks (no partial blocks), else None."""
    if spec.block_mask is None or spec.block_mask.feature != "block_sparse":
        return None
    return spec.block_mask.block_size


def _list_tensors(spec: AttentionSpec, args: ForwardArgs) -> dict[str, Any]:
    """The Hopper forward's block-list arguments of the call (none without a block-sparse mask)."""
    block_size = _sparse_blocks(spec)
    if block_size is None or args.masks is None or args.masks.block_mask is None:
        return {}
    lists = args.masks.block_mask.lists
    return {"kv_counts": lists.kv_counts, "kv_indices": lists.kv_indices, "block_size": block_size}


@functools.lru_cache(maxsize=1024)
def _hopper_reasons(spec: AttentionSpec) -> tuple[str, ...]:
    """Why the Hopper kernel cannot run ``spec`` (empty: it runs it), from the spec alone (the outputs
    are core's contiguous allocations)."""
    if spec.device.type != "cuda" or not torch.cuda.is_available():
        return ("no CUDA device",)
    reasons = hopper.problem_reasons(
        capability=_capability(_index(spec.device)), dtype=spec.dtype, head_dim=spec.head_dim,
        heads_q=spec.heads_q, heads_kv=spec.heads_kv, batch=spec.batch, seqlen_q=spec.seqlen_q,
        seqlen_k=spec.seqlen_k, total_q=spec.total_q, total_k=spec.total_k, window=spec.mask_bounds,
        softcap=spec.softcap, scale=spec.scale, intervals=_has_intervals(spec), block_size=_sparse_blocks(spec),
    )  # fmt: skip
    item = torch.empty((), dtype=spec.dtype).element_size()
    rows = {"q": spec.total_q if spec.varlen else spec.seqlen_q, "k": spec.total_k if spec.varlen else spec.seqlen_k}
    for name, strides, heads in (("q", spec.q_strides, spec.heads_q), ("k", spec.k_strides, spec.heads_kv),
                                 ("v", spec.v_strides, spec.heads_kv)):  # fmt: skip
        shape = (1 if spec.varlen else spec.batch, rows["q" if name == "q" else "k"], heads, spec.head_dim)
        reasons += hopper.layout_reasons(name, shape, strides, item, 0 if spec.aligned16 else 1)
    return tuple(reasons)


@functools.lru_cache(maxsize=1024)
def _variant(config: heuristics.KernelConfig, head_dim: int, bf16: bool, mask: int, index: int) -> Variant:
    arch = nvrtc_arch(_capability(index))
    return make_variant(config, head_dim, bf16, mask, arch, smem_limit=_smem_optin(index))


def _forward_reasons(spec: AttentionSpec) -> list[str]:
    if spec.is_fp8 and spec.out_dtype not in (torch.bfloat16, torch.float16):
        return [f"fp8 output {spec.out_dtype}: the Hopper kernel writes bfloat16 or float16"]
    if not _hopper_reasons(spec):
        return []
    # The mma.sync kernel runs it: what only the Hopper kernel has is out of reach.
    declines = "; ".join(_hopper_reasons(spec))
    only_hopper = ((spec.is_fp8, "fp8 inputs"), (spec.softcap, "softcap"),
                   (_has_intervals(spec), "key-padding masks and key intervals"),
                   (_sparse_blocks(spec) is not None, "block-sparse masks"))  # fmt: skip
    for needs, what in only_hopper:
        if needs:
            return [f"{what}: only the Hopper kernel has them, and it declines: {declines}"]
    if launch.grid_size(spec, 16) > launch.MAX_GRID:
        return ["more than 2**31 - 1 thread blocks"]
    return []


def _backward_reasons(spec: AttentionSpec) -> list[str]:
    return list(_hopper_bwd_reasons(spec)) if spec.device.type == "cuda" else []


@functools.lru_cache(maxsize=1024)
def _hopper_bwd_reasons(spec: AttentionSpec) -> tuple[str, ...]:
    """Why the Hopper backward cannot run ``spec`` (empty: it runs it), from the spec alone (dQ, dK
    and dV are core's contiguous allocations; dout is made unit-stride along head_dim by core).
    Without a CUDA device (the docs' support table) it answers for an sm_90 one."""
    capability = _capability(_index(spec.device)) if torch.cuda.is_available() else (9, 0)
    reasons = hopper_bwd.problem_reasons(
        capability=capability, dtype=spec.dtype, head_dim=spec.head_dim,
        heads_q=spec.heads_q, heads_kv=spec.heads_kv, batch=spec.batch, seqlen_q=spec.seqlen_q,
        seqlen_k=spec.seqlen_k, total_q=spec.total_q, total_k=spec.total_k, scale=spec.scale, varlen=spec.varlen,
        softcap=spec.softcap, dropout=bool(spec.dropout_p), deterministic=spec.deterministic,
        key_padding=spec.key_padding, key_intervals=spec.block_mask is not None and spec.block_mask.intervals,
        alibi=spec.alibi != "none", window=spec.mask_bounds,
    )  # fmt: skip
    item = torch.empty((), dtype=spec.dtype).element_size()
    batch = 1 if spec.varlen else spec.batch  # a packed batch: one canonical row of tokens
    rows_q, rows_k = (spec.total_q, spec.total_k) if spec.varlen else (spec.seqlen_q, spec.seqlen_k)
    for name, strides, heads, rows in (("q", spec.q_strides, spec.heads_q, rows_q),
                                       ("k", spec.k_strides, spec.heads_kv, rows_k),
                                       ("v", spec.v_strides, spec.heads_kv, rows_k)):  # fmt: skip
        shape = (batch, rows, heads, spec.head_dim)
        reasons += hopper_bwd.layout_reasons(name, shape, strides, item, 0 if spec.aligned16 else 1)
    return tuple(reasons)
