"""The one reading of a backend's declarations: why it cannot run a problem.

Dispatch, :func:`flash.explain` and the docs' support table all call :func:`reasons`, so what
a user is told and what dispatch does cannot drift apart.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from flash.backend import Backend, Pass, Support
from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.kvspec import KVCacheSpec


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


def declared_reasons(support: Support, spec: AttentionSpec | KVCacheSpec) -> list[str]:
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
    batch, heads, tokens, token_stride = spec.limit_sizes()
    sizes = (
        ("batch", limits.batch, batch),
        ("heads", limits.heads, heads),
        ("tokens", limits.tokens, tokens),
        ("token stride", limits.token_stride, token_stride),
    )
    out += [
        f"{what} {value} above the limit {limit}" for what, limit, value in sizes if limit is not None and value > limit
    ]
    return out


_MISSING = {"backward": "no backward pass", "decode": "no KV-cache (decode) pass"}


def pass_support(backend: Backend, pass_: Pass) -> Support | None:
    """What ``backend`` declares for ``pass_`` (None: it has no such pass)."""
    if pass_ == "forward":
        return backend.forward_support
    if pass_ == "backward":
        return backend.backward_support
    return getattr(backend, "decode_support", None)  # a plugin older than the KV-cache pass has none


def reasons(backend: Backend, spec: AttentionSpec | KVCacheSpec, pass_: Pass) -> list[str]:
    """Why ``backend`` cannot run ``pass_`` of ``spec``: its declarations, then its hook."""
    try:
        support = pass_support(backend, pass_)
        if support is None:
            return [_MISSING[pass_]]
        out = declared_reasons(support, spec)
        if isinstance(spec, AttentionSpec):
            extra = backend.extra_reasons(spec, pass_)
        else:
            extra = backend.decode_extra_reasons(spec)
        return out + [str(r) for r in extra]
    except Exception as error:  # a broken plugin is reported, never fatal
        return [f"support check failed: {type(error).__name__}: {error}"]
