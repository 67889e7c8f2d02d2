"""The one reading of a backend's declarations: why it cannot run a problem.

Dispatch, :func:`flash.explain` and the docs' support table all call :func:`reasons`, so what
a user is told and what dispatch does cannot drift apart.
"""

from __future__ import annotations

import functools

import torch

from flash.backend import Backend, Pass, Support
from flash.spec import AttentionSpec


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _head_dims(r: range) -> str:
    if r.step == 1:
        return f"{r.start}..{r.stop - 1}"
    return f"multiples of {r.step} from {r.start} to {r.stop - 1}"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA ``device`` (None elsewhere, or without a GPU to ask)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def declared_reasons(support: Support, spec: AttentionSpec) -> list[str]:
    """Why a pass declared by ``support`` cannot run ``spec`` (empty: it can)."""
    out = []
    if spec.device.type not in support.devices:
        out.append(f"tensors on {spec.device.type}, supports {'/'.join(sorted(support.devices))}")
    if spec.dtype not in support.dtypes:
        names = ", ".join(sorted(_dtype_name(d) for d in support.dtypes))
        out.append(f"dtype {_dtype_name(spec.dtype)} not supported (supports {names})")
    if spec.head_dim not in support.head_dims:
        out.append(f"head_dim {spec.head_dim} not supported (supports {_head_dims(support.head_dims)})")
    out += [f"{feature} not supported" for feature in sorted(spec.features() - support.features)]
    if support.aligned16 and not spec.aligned16:
        out.append("q/k/v pointers or strides are not multiples of 16 bytes; call .contiguous()")
    if support.min_capability is not None:
        found = device_capability(spec.device)
        if found is not None and found < support.min_capability:
            need = "sm_{}{}".format(*support.min_capability)
            out.append(f"{spec.device} is sm_{found[0]}{found[1]}; needs {need} or newer")
    limits = support.limits
    sizes = (
        ("batch", limits.batch, spec.batch),
        ("heads", limits.heads, spec.heads_q),
        ("tokens", limits.tokens, max(spec.seqlen_q, spec.seqlen_k, spec.total_q, spec.total_k)),
        ("token stride", limits.token_stride, max(spec.q_strides[1], spec.k_strides[1], spec.v_strides[1])),
    )
    out += [
        f"{what} {value} above the limit {limit}" for what, limit, value in sizes if limit is not None and value > limit
    ]
    return out


def reasons(backend: Backend, spec: AttentionSpec, pass_: Pass) -> list[str]:
    """Why ``backend`` cannot run ``pass_`` of ``spec``: its declarations, then its hook."""
    try:
        support = backend.forward_support if pass_ == "forward" else backend.backward_support
        if support is None:
            return ["no backward pass"]
        out = declared_reasons(support, spec)
        return out + [str(r) for r in backend.extra_reasons(spec, pass_)]
    except Exception as error:  # a broken plugin is reported, never fatal
        return [f"support check failed: {type(error).__name__}: {error}"]
