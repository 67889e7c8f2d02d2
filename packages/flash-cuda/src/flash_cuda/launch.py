"""Launching the forward kernel on the caller's tensors, in place, on the caller's torch stream.

No copies (the kernel takes every stride), no host synchronisation, no device allocation: the
launch is a single ``cuLaunchKernel`` on ``torch.cuda.current_stream()``, so it can be captured in
a CUDA graph.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from flash.backend import ForwardArgs
from flash.spec import AttentionSpec
from flash_cuda import compile as compiler
from flash_cuda.variants import Variant

#: Stand-in for an unbounded window side (any reach past the longest supported sequence).
UNBOUNDED_REACH = 1 << 30
#: Longest sequence the kernel's 32-bit index arithmetic supports (mask offsets stay within +-2**30).
MAX_SEQLEN = (1 << 29) - 1
MAX_GRID = 2**31 - 1
LOG2E = 1.4426950408889634


def grid_size(spec: AttentionSpec, block_m: int) -> int:
    return -(-spec.seqlen_q // block_m) * spec.heads_q * spec.batch


def _reach(value: int) -> int:
    return UNBOUNDED_REACH if value < 0 else min(value, UNBOUNDED_REACH)


def _aligned16(t: torch.Tensor) -> bool:
    item = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * item) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def kernel_arguments(spec: AttentionSpec, args: ForwardArgs, variant: Variant) -> tuple:
    """The kernel's parameter list (see kernels/flash_fwd.cu) as NumPy scalars of the exact C types."""
    q, k, v, out, lse = args.q, args.k, args.v, args.out, args.lse
    cu_q, cu_k = args.cu_seqlens_q, args.cu_seqlens_k  # contiguous: core makes them so

    def strides(t: torch.Tensor) -> list[np.int64]:
        b, s, h = t.stride()[:3]
        return [np.int64(0 if spec.varlen else b), np.int64(s), np.int64(h)]

    l_b, l_h, l_s = lse.stride()
    left, right = spec.mask_bounds
    m_blocks = -(-spec.seqlen_q // variant.block_m)
    pointers = [np.uint64(t.data_ptr()) for t in (q, k, v, out, lse)]
    pointers += [np.uint64(0 if t is None else t.data_ptr()) for t in (cu_q, cu_k)]
    return (
        *pointers,
        *strides(q),
        *strides(k),
        *strides(v),
        *strides(out),
        np.int64(0 if spec.varlen else l_b),
        np.int64(l_h),
        np.int64(l_s),
        np.int32(spec.seqlen_q),
        np.int32(spec.seqlen_k),
        np.int32(spec.total_q),
        np.int32(spec.total_k),
        np.int32(spec.heads_q),
        np.int32(spec.group_size),
        np.int32(spec.head_dim),
        np.int32(m_blocks),
        np.int32(_reach(left)),
        np.int32(_reach(right)),
        np.float32(spec.scale * LOG2E),
    )


_streams: dict[tuple[int, int], Any] = {}


def cupy_stream(handle: int, device_index: int) -> Any:
    """A CuPy view of the CUDA stream ``handle`` (torch's current stream), cached per handle."""
    key = (handle, device_index)
    found = _streams.get(key)
    if found is None:
        import cupy

        if len(_streams) > 64:  # streams come and go; the wrappers own nothing
            _streams.clear()
        with warnings.catch_warnings():
            # CuPy 14 prefers Stream.from_external(obj with __cuda_stream__); ExternalStream still works.
            warnings.simplefilter("ignore", DeprecationWarning)
            found = _streams[key] = cupy.cuda.ExternalStream(handle, device_index)
    return found


def forward(spec: AttentionSpec, args: ForwardArgs, variant: Variant) -> None:
    """Fill ``args.out`` and ``args.lse`` with one kernel launch on the current torch stream."""
    import cupy

    grid = grid_size(spec, variant.block_m)
    if grid == 0:  # no query heads: nothing to write
        return
    if not _aligned16(args.out):
        raise RuntimeError("flash-cuda: the output tensor must be 16-byte aligned (core allocates it so)")
    device = args.q.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    kern = compiler.kernel(variant, index)
    params = kernel_arguments(spec, args, variant)
    stream = cupy_stream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kern((grid, 1, 1), (variant.threads, 1, 1), params, shared_mem=variant.smem_bytes)
