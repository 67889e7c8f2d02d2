"""The plugin API every backend implements.

A backend is an object registered under the entry-point group ``flash.backends``
(the entry point names a class or a zero-argument factory). It *declares* what it
supports as data (:class:`Support`, one per pass), which one generic check in core
(:func:`flash.support.reasons`) reads for dispatch, :func:`flash.explain` and the
docs' support table alike; a hook (:meth:`Backend.extra_reasons`) covers what a
declaration cannot say. Core calls the backend with an :class:`~flash.spec.AttentionSpec`,
tensors in canonical (batch, seqlen, heads, head_dim) order and the kernel
configuration it looked up once per problem class; the backend writes its results
into the output tensors core allocated. A backend never validates user input: the
spec already did.

The LSE contract, shared by every forward and backward so that any forward pairs
with any backward: ``lse[b, h, i]`` is the natural-log sum of
``exp(scale * q_i . k_j)`` (after softcap) over the keys row ``i`` sees, in
float32 (float64 for float64 inputs), ``-inf`` for a row that sees no key, laid out (batch, heads_q, seqlen_q)
(for varlen: (1, heads_q, total_q), rows indexed by token). With sink logits the sum has one
more term, ``exp(sink[h])``, so a backward that recomputes ``P`` from the LSE needs no change.

The KV-cache pass (optional, :attr:`Backend.decode_support` and :meth:`Backend.decode`) takes a
:class:`~flash.kvspec.KVCacheSpec` and :class:`DecodeArgs`; a backend without it stays a valid
plugin API 2 backend (dispatch says "no KV-cache pass").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from flash.spec import AttentionSpec

if TYPE_CHECKING:
    from flash.block_mask import BlockMask
    from flash.heuristics import KernelConfig
    from flash.kvspec import KVCacheSpec

#: The plugin API this flash-core speaks. A backend declares the version it was
#: built for in :attr:`Backend.plugin_api`; core refuses any other with a reason.
#: Version 2: declarative :class:`Support`, the configuration passed to ``forward``/``backward``,
#: backend-owned heuristics tables.
PLUGIN_API_VERSION = 2

Pass = Literal["forward", "backward", "decode"]

#: Every name :meth:`flash.spec.AttentionSpec.features` can report. "out_dtype": fp8 inputs with an
#: output dtype other than the default bf16 (``spec.out_dtype``, bf16 or fp16); a forward that declares
#: it stores ``out`` in whichever of them it is given. "key_padding": a boolean ``attn_mask`` of shape
#: (batch|1, 1, 1, Sk) (reported instead of "attn_mask"); "key_intervals": a block mask with
#: :attr:`flash.BlockMask.key_intervals` (reported instead of "block_mask"); "block_sparse": any other block
#: mask without partial blocks (:attr:`flash.block_mask.BlockMaskInfo.partial`; reported instead of
#: "block_mask"): a kernel walks its block lists and masks no score but past the sequence's end.
FEATURES = frozenset(
    {"causal", "window", "softcap", "varlen", "gqa", "dropout", "fp8", "deterministic", "sinks", "sink_tokens"}
    | {"attn_mask", "attn_bias", "attn_bias_grad", "alibi", "block_mask", "score_mod", "mask_mod", "out_dtype"}
    | {"key_padding", "key_intervals", "block_sparse"}
)
#: Every name :meth:`flash.kvspec.KVCacheSpec.features` can report ("fp8": an fp8 cache).
DECODE_FEATURES = frozenset(
    {
        "causal",
        "window",
        "softcap",
        "gqa",
        "fp8",
        "sinks",
        "sink_tokens",
        "paged",
        "append",
        "rotary",
        "cache_batch_idx",
    }
)


@dataclass(frozen=True)
class Limits:
    """Largest sizes a pass handles (``None``: no limit). Checked exactly against each problem."""

    batch: int | None = None
    heads: int | None = None
    #: Longest sequence and largest token count (varlen totals included).
    tokens: int | None = None
    #: Largest stride between tokens, in elements (kernels with 32-bit offsets care).
    token_stride: int | None = None


@dataclass(frozen=True)
class Support:
    """What one pass of a backend runs, as data.

    ``head_dims`` is a range (``range(8, 257, 8)``: multiples of 8 up to 256); ``features`` names
    the :meth:`~flash.spec.AttentionSpec.features` it handles; ``min_capability`` is the oldest
    CUDA compute capability (ignored on other devices); ``aligned16`` asks for 16-byte aligned
    pointers and strides (what TMA and 16-byte vector loads need).
    """

    dtypes: frozenset[torch.dtype]
    features: frozenset[str]
    head_dims: range = range(1, 257)
    devices: frozenset[str] = frozenset({"cuda"})
    min_capability: tuple[int, int] | None = None
    aligned16: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        known = FEATURES | DECODE_FEATURES
        unknown = set(self.features) - known
        if unknown:
            raise ValueError(f"Support: unknown features {sorted(unknown)}; known: {sorted(known)}")


@dataclass(frozen=True)
class MaskTensors:
    """The tensors behind a spec's mask and score options.

    ``attn_mask`` is viewed as 4-D (batch|1, heads|1, seqlen_q|1, seqlen_k|1) (a size-1 axis
    broadcasts; read it with its strides); ``alibi_slopes`` is float32 (heads,) or (batch, heads);
    ``block_mask`` a :class:`flash.BlockMask` whose sizes the spec checked.
    """

    attn_mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    block_mask: BlockMask | None = None


@dataclass(frozen=True)
class ForwardArgs:
    """Tensors of one forward call, all in canonical order.

    ``q``/``k``/``v``: (batch, seqlen, heads, head_dim) views with the caller's strides
    (varlen: batch 1, seqlen = tokens). ``out`` is like ``q`` with ``spec.out_dtype``;
    ``lse`` is float32 (batch, heads_q, seqlen_q). The backend fills both entirely.
    ``cu_seqlens_q``/``cu_seqlens_k`` are contiguous int32 (core makes them so).
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
    #: The call's mask tensors (see :class:`MaskTensors`); None when it has none.
    masks: MaskTensors | None = None
    #: float32 (heads_q,) sink logits (contiguous), or None.
    sinks: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeArgs:
    """Tensors of one KV-cache call (see :func:`flash.attention_with_kvcache` for their shapes).

    ``cache_seqlens`` is always an int32 (batch,) tensor on the device. Lengths, page numbers and
    batch indices are *not* checked on a GPU (that would synchronise): a backend clamps each one
    it reads the documented way (:mod:`flash.kvspec`), so no access leaves the tensors. The backend
    appends ``k``/``v`` (rotated, quantised for an fp8 cache) at each sequence's position, then
    fills ``out`` (like ``q``) and ``lse`` (float32 (batch, heads_q, seqlen_q)) entirely; it writes
    nothing else but its own workspace.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    cache_batch_idx: torch.Tensor | None = None
    rotary_cos: torch.Tensor | None = None
    rotary_sin: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
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
    masks: MaskTensors | None = None
    #: When ``spec.mask.requires_grad``: zeros (batch, heads_q, seqlen_q, seqlen_k) in the LSE's dtype,
    #: where the backward writes the gradient of the scores after the additive mask (core sums it
    #: down to the mask's broadcast shape).
    dbias: torch.Tensor | None = None


class Backend(ABC):
    """Base class of backends. Subclasses set the class attributes and implement the methods."""

    #: Registry name, e.g. ``"triton"``. Must match the entry point's name.
    name: ClassVar[str] = ""
    #: The backend package's version.
    version: ClassVar[str] = "0"
    #: The :data:`PLUGIN_API_VERSION` the backend was built for.
    plugin_api: ClassVar[int] = PLUGIN_API_VERSION
    #: Default dispatch priority; the highest usable one wins. Users may override it.
    priority: ClassVar[int] = 0
    #: What the forward runs (a property where it depends on the machine, e.g. an interpreter mode).
    forward_support: Support
    #: What the backward runs; ``None``: no backward (another backend's pairs through the LSE).
    backward_support: Support | None = None
    #: What the KV-cache pass runs (features from :data:`DECODE_FEATURES`); ``None``: no such pass.
    decode_support: Support | None = None

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing package, no GPU...).

        Empty when usable. Called once per process; keep it cheap and import-light.
        """
        return []

    def extra_reasons(self, spec: AttentionSpec, pass_: Pass) -> list[str]:
        """What the declarations cannot say (a grid-size limit, a kernel-specific constraint)."""
        return []

    def decode_extra_reasons(self, spec: KVCacheSpec) -> list[str]:
        """What :attr:`decode_support` cannot say about a KV-cache problem."""
        return []

    def shared_memory_row(self, head_dim: int) -> int:
        """Elements one tile row occupies in shared memory (head dim as the kernel stores it,
        padding included); :mod:`flash.heuristics.smem` budgets tiles with it."""
        return head_dim

    def heuristics_rows(self) -> list[dict[str, Any]]:
        """This backend's kernel-configuration table rows (format of :mod:`flash.heuristics`)."""
        return []

    def runtime_versions(self) -> str:
        """Versions of what the kernels depend on beyond torch (compiler, driver), for autotune keys."""
        return ""

    @abstractmethod
    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: KernelConfig) -> None:
        """Compute ``args.out`` and ``args.lse`` in place with kernel configuration ``config``."""

    def backward(self, spec: AttentionSpec, args: BackwardArgs, config: KernelConfig) -> None:
        """Compute ``args.dq``, ``args.dk``, ``args.dv`` in place."""
        raise NotImplementedError(f"backend {self.name!r} has no backward pass")

    def decode(self, spec: KVCacheSpec, args: DecodeArgs, config: KernelConfig) -> None:
        """Append ``args.k``/``args.v`` to the cache, then fill ``args.out`` and ``args.lse`` (split
        into ``spec.num_splits`` parts of the keys, merged exactly; see :func:`flash.merge_states`)."""
        raise NotImplementedError(f"backend {self.name!r} has no KV-cache pass")

    def tuning_candidates(self, spec: AttentionSpec, pass_: Pass) -> list[KernelConfig]:
        """Configurations worth timing for ``spec`` when autotuning is on (``FLASH_AUTOTUNE=1``).

        Each is passed to :meth:`forward`/:meth:`backward` while it is measured. Empty: nothing to tune.
        """
        return []
