"""The plugin API every backend implements.

A backend is an object registered under the entry-point group ``flash.backends``
(the entry point names a class or a zero-argument factory). Core calls it with
an :class:`~flash.spec.AttentionSpec` and tensors in canonical
(batch, seqlen, heads, head_dim) order; the backend writes its results into the
output tensors core allocated. A backend never validates user input: the spec
already did. It only says what it *supports*, as human-readable reasons.

The LSE contract, shared by every forward and backward so that any forward pairs
with any backward: ``lse[b, h, i]`` is the natural-log sum of
``exp(scale * q_i . k_j)`` (after softcap) over the keys row ``i`` sees, in
float32 (float64 for float64 inputs), ``-inf`` for a row that sees no key, laid out (batch, heads_q, seqlen_q)
(for varlen: (1, heads_q, total_q), rows indexed by token).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.heuristics import KernelConfig

#: The plugin API this flash-core speaks. A backend declares the version it was
#: built for in :attr:`Backend.plugin_api`; core refuses any other with a reason.
PLUGIN_API_VERSION = 1


@dataclass(frozen=True)
class ForwardArgs:
    """Tensors of one forward call, all in canonical order.

    ``q``/``k``/``v``: (batch, seqlen, heads, head_dim) views with the caller's strides
    (varlen: batch 1, seqlen = tokens). ``out`` is like ``q`` with ``spec.out_dtype``;
    ``lse`` is float32 (batch, heads_q, seqlen_q). The backend fills both entirely.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    q_descale: torch.Tensor | None = None
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None


@dataclass(frozen=True)
class BackwardArgs:
    """Tensors of one backward call, all in canonical order.

    ``out``/``lse`` come from *some* backend's forward (the LSE contract above).
    ``dq``/``dk``/``dv`` are like ``q``/``k``/``v`` and are filled entirely.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    dout: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None


class Backend(ABC):
    """Base class of backends. Subclasses set the class attributes and implement the methods."""

    #: Registry name, e.g. ``"triton"``. Must match the entry point's name.
    name: str = ""
    #: The backend package's version.
    version: str = "0"
    #: The :data:`PLUGIN_API_VERSION` the backend was built for.
    plugin_api: int = PLUGIN_API_VERSION
    #: Default dispatch priority; the highest usable one wins. Users may override it.
    priority: int = 0

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing package, no GPU...).

        Empty when usable. Called once per process; keep it cheap and import-light.
        """
        return []

    @abstractmethod
    def forward_reasons(self, spec: AttentionSpec) -> list[str]:
        """Why this backend cannot run the forward of ``spec``; empty when it can."""

    def backward_reasons(self, spec: AttentionSpec) -> list[str]:
        """Why this backend cannot run the backward of ``spec``; empty when it can."""
        return ["no backward pass"]

    @abstractmethod
    def forward(self, spec: AttentionSpec, args: ForwardArgs) -> None:
        """Compute ``args.out`` and ``args.lse`` in place."""

    def backward(self, spec: AttentionSpec, args: BackwardArgs) -> None:
        """Compute ``args.dq``, ``args.dk``, ``args.dv`` in place."""
        raise NotImplementedError(f"backend {self.name!r} has no backward pass")

    def tuning_candidates(self, spec: AttentionSpec, pass_: str) -> list[KernelConfig]:
        """Configurations worth timing for ``spec`` when autotuning is on (``FLASH_AUTOTUNE=1``).

        The backend reads its configuration through :func:`flash.heuristics.config_for`, which
        answers each candidate in turn while it is measured. Empty: nothing to tune.
        """
        return []


def reasons_for_unsupported(
    spec: AttentionSpec,
    *,
    dtypes: tuple[torch.dtype, ...],
    features: frozenset[str] | set[str],
    head_dims: range | tuple[int, ...] | None = None,
    device_types: tuple[str, ...] = ("cuda",),
) -> list[str]:
    """Common support checks a backend can build its ``*_reasons`` on.

    ``features`` are the :meth:`flash.spec.AttentionSpec.features` names the backend handles.
    """
    reasons = []
    if spec.device.type not in device_types:
        reasons.append(f"tensors on {spec.device.type}, supports {'/'.join(device_types)}")
    if spec.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        reasons.append(f"dtype {str(spec.dtype).replace('torch.', '')} not supported (supports {names})")
    if head_dims is not None and spec.head_dim not in head_dims:
        reasons.append(f"head_dim {spec.head_dim} not supported")
    for feature in sorted(spec.features() - set(features)):
        reasons.append(f"{feature} not supported")
    return reasons
