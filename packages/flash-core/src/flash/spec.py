"""The attention spec: what an attention problem is and what is valid.

:func:`build_spec` turns the tensors and options of one call into an immutable,
hashable :class:`AttentionSpec`, rejecting anything out of the spec with an
:class:`~flash.errors.InvalidInputError` before any kernel runs. Every backend
receives the same spec and the tensors as *canonical views*: (batch, seqlen,
heads, head_dim) index order whatever the caller's layout, with the caller's
strides (no copies). A variable-length batch is viewed as batch 1 of
``total`` tokens; ``cu_seqlens`` say where each sequence starts.

Masking semantics (shared by every backend; see :mod:`flash.masking`):
query row ``i`` of a sequence with ``len_q`` queries and ``len_k`` keys sees
key ``j`` iff ``i + off - left <= j <= i + off + right`` with
``off = len_k - len_q`` (bottom-right alignment, as flash-attn 2.1+), where an
unbounded side is ``-1``. ``causal=True`` is ``right = 0``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from flash.block_mask import BlockMask, BlockMaskInfo
from flash.errors import InvalidInputError
from flash.mask_checks import Alibi, MaskInfo, check_mask_arguments

Layout = Literal["bshd", "bhsd"]
LAYOUTS: tuple[str, ...] = ("bshd", "bhsd")
UNBOUNDED = -1
#: Largest window reach (kernels index with 32 bits; no sequence is longer).
MAX_REACH = 2**31 - 1
MAX_HEAD_DIM = 256
#: Largest scale or softcap: their products with log2(e) and scores must stay finite in float32.
MAX_FLOAT32_FACTOR = 2.0**120
#: Smallest scale or softcap: a normal float32 (a denormal or zero factor loses every score).
MIN_FLOAT32_FACTOR = 2.0**-120

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SUPPORTED_DTYPES = KERNEL_DTYPES + REFERENCE_DTYPES + FP8_DTYPES
#: Output dtypes an fp8 call may ask for (``out_dtype=``); the first is the default.
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16)

Descale = Literal["none", "tensor", "head"]


class Scores:
    """What an attention spec and a KV-cache spec share: heads, the LSE's dtype, the mask's reach."""

    heads_q: int
    heads_kv: int
    dtype: torch.dtype
    causal: bool
    window: tuple[int, int]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 = MHA, heads_q = MQA)."""
        return self.heads_q // self.heads_kv

    @property
    def lse_dtype(self) -> torch.dtype:
        """float32, or float64 for float64 inputs (so a float64 backward stays exact)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def mask_bounds(self) -> tuple[int, int]:
        """Effective (left, right) reach of each query, ``-1`` for unbounded; causal makes right 0."""
        left, right = self.window
        return left, (0 if self.causal else right)


@dataclass(frozen=True)
class AttentionSpec(Scores):
    """One validated attention problem. Immutable and hashable (usable as a cache key)."""

    batch: int
    seqlen_q: int  # for varlen: max_seqlen_q
    seqlen_k: int  # for varlen: max_seqlen_k
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    layout: Layout
    varlen: bool
    total_q: int  # tokens in q: batch * seqlen_q, or cu_seqlens_q[-1]
    total_k: int
    causal: bool
    window: tuple[int, int]  # (left, right) as given; (-1, -1) when no window
    softcap: float  # 0.0 = off
    scale: float
    dropout_p: float
    dropout_seed: int
    deterministic: bool
    descale: Descale
    # Canonical (batch, seqlen, heads, head_dim) strides in elements; batch stride 0 for varlen.
    q_strides: tuple[int, int, int, int]
    k_strides: tuple[int, int, int, int]
    v_strides: tuple[int, int, int, int]
    # Base pointers and non-unit strides are multiples of 16 bytes (what TMA and 16-byte loads need).
    aligned16: bool
    # Masks and score terms beyond causal/window (see flash.terms for the order they apply in).
    mask: MaskInfo | None = None
    alibi: Alibi = "none"
    block_mask: BlockMaskInfo | None = None
    score_mod: Callable[..., torch.Tensor] | None = None
    score_mod_grad: Callable[..., torch.Tensor] | None = None
    mask_mod: Callable[..., torch.Tensor] | None = None
    #: Learned per-head sink logits (``sinks=``): one more term in every row's softmax denominator.
    sinks: bool = False
    #: The first ``sink_tokens`` keys stay visible to every row whatever the window's left reach
    #: (StreamingLLM); 0 when off, and always 0 without a bounded left reach (nothing to add then).
    sink_tokens: int = 0
    #: The caller's ``out_dtype`` where it is not the default (fp16 output of fp8 inputs), else None,
    #: so that equal problems have equal specs; :attr:`out_dtype` is the dtype the output has.
    chosen_out_dtype: torch.dtype | None = None

    @property
    def is_fp8(self) -> bool:
        """True for float8 inputs (e4m3 or e5m2)."""
        return self.dtype in FP8_DTYPES

    @property
    def out_dtype(self) -> torch.dtype:
        """The output's dtype: the caller's ``out_dtype``, else the inputs' own (bf16 for fp8 inputs)."""
        return self.chosen_out_dtype or default_out_dtype(self.dtype)

    @property
    def masked(self) -> bool:
        """True when some query may not see some key (causal or a bounded window)."""
        return self.mask_bounds != (UNBOUNDED, UNBOUNDED)

    @property
    def extra_masks(self) -> bool:
        """True when a mask beyond causal/window may hide keys (boolean attn_mask, mask_mod, block mask)."""
        bool_mask = self.mask is not None and self.mask.kind == "bool"
        return bool_mask or self.mask_mod is not None or self.block_mask is not None

    @property
    def score_terms(self) -> bool:
        """True when scores get more than scale and softcap (ALiBi, additive attn_mask, score_mod)."""
        bias = self.mask is not None and self.mask.kind == "bias"
        return bias or self.alibi != "none" or self.score_mod is not None

    @property
    def empty(self) -> bool:
        """True when there is nothing for a kernel to do (no queries, or no keys: output 0, LSE -inf)."""
        return self.total_q == 0 or self.total_k == 0 or self.batch == 0

    def lse_shape(self) -> tuple[int, ...]:
        """Shape of the LSE the caller receives: (batch, heads, seqlen_q), or (heads, total_q) for varlen."""
        if self.varlen:
            return (self.heads_q, self.total_q)
        return (self.batch, self.heads_q, self.seqlen_q)

    @property
    def key_padding(self) -> bool:
        """Whether ``attn_mask`` is a boolean mask shared by every query and head, (batch|1, 1, 1, Sk): a
        key-padding mask, which kernels read as one interval of keys per sequence
        (:func:`flash.masking.key_runs`)."""
        return self.mask is not None and self.mask.kind == "bool" and self.mask.shape[1:3] == (1, 1)

    def features(self) -> frozenset[str]:
        """Names of the non-default options this problem uses (for support declarations)."""
        used = set()
        if self.causal:
            used.add("causal")
        if self.window != (UNBOUNDED, UNBOUNDED):
            used.add("window")
        if self.softcap:
            used.add("softcap")
        if self.varlen:
            used.add("varlen")
        if self.heads_q != self.heads_kv:
            used.add("gqa")
        if self.dropout_p:
            used.add("dropout")
        if self.is_fp8:
            used.add("fp8")
        if self.deterministic:
            used.add("deterministic")
        if self.mask is not None:
            used.add(("key_padding" if self.key_padding else "attn_mask") if self.mask.kind == "bool" else "attn_bias")
            if self.mask.requires_grad:
                used.add("attn_bias_grad")
        if self.alibi != "none":
            used.add("alibi")
        if self.block_mask is not None:
            used.add(self.block_mask.feature)
        if self.score_mod is not None:
            used.add("score_mod")
        if self.mask_mod is not None:
            used.add("mask_mod")
        if self.sinks:
            used.add("sinks")
        if self.sink_tokens:
            used.add("sink_tokens")
        if self.chosen_out_dtype is not None:
            used.add("out_dtype")
        return frozenset(used)

    def limit_sizes(self) -> tuple[int, int, int, int]:
        """(batch, heads, longest sequence or token count, largest token stride) for :class:`~flash.backend.Limits`."""
        tokens = max(self.seqlen_q, self.seqlen_k, self.total_q, self.total_k)
        return self.batch, self.heads_q, tokens, max(self.q_strides[1], self.k_strides[1], self.v_strides[1])


# --------------------------------------------------------------------------- validation helpers


def describe_tensor(t: torch.Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(name, "a torch.Tensor", type(t).__name__)
    return t


def check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidInputError(
            name,
            "unit stride in the last (head_dim) dimension (call .contiguous())",
            f"strides {tuple(t.stride())}",
        )


def _canonical_strides(t: torch.Tensor, layout: str, varlen: bool) -> tuple[int, int, int, int]:
    s = t.stride()
    if varlen:  # (tokens, heads, d) or (heads, tokens, d)
        tok, head = (s[0], s[1]) if layout == "bshd" else (s[1], s[0])
        return (0, tok, head, s[2])
    if layout == "bshd":
        return (s[0], s[1], s[2], s[3])
    return (s[0], s[2], s[1], s[3])


def is_aligned16(tensors: list[torch.Tensor]) -> bool:
    for t in tensors:
        item = t.element_size()
        try:
            address = t.data_ptr()
        except RuntimeError:  # a fake tensor while tracing has no storage; nothing reads this spec's memory
            return False
        if address % 16:
            return False
        if any((st * item) % 16 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
            return False
    return True


def _dims(t: torch.Tensor, layout: str, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, seqlen, heads, head_dim) of a q/k/v tensor; batch 1 and seqlen = tokens for varlen."""
    if varlen:
        tokens, heads = (t.shape[0], t.shape[1]) if layout == "bshd" else (t.shape[1], t.shape[0])
        return 1, tokens, heads, t.shape[2]
    if layout == "bshd":
        return t.shape[0], t.shape[1], t.shape[2], t.shape[3]
    return t.shape[0], t.shape[2], t.shape[1], t.shape[3]


def _layout_words(layout: str, varlen: bool) -> str:
    if varlen:
        return "(total_tokens, heads, head_dim)" if layout == "bshd" else "(heads, total_tokens, head_dim)"
    return "(batch, seqlen, heads, head_dim)" if layout == "bshd" else "(batch, heads, seqlen, head_dim)"


def value_checks(device: torch.device) -> bool:
    """Whether value checks run by default for tensors on ``device``: only where they cost no sync."""
    return device.type == "cpu"


def _check_cu_seqlens(
    name: str, cu: torch.Tensor, batch: int | None, total: int, device: torch.device, check_values: bool
) -> tuple[int, int | None]:
    """Validate one cu_seqlens tensor; return (batch, longest sequence or None if values unchecked)."""
    if cu.dtype != torch.int32:
        raise InvalidInputError(name, "dtype torch.int32", str(cu.dtype))
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise InvalidInputError(name, "a 1-D tensor of batch + 1 offsets", f"shape {tuple(cu.shape)}")
    if cu.device != device:
        raise InvalidInputError(name, f"device {device} (same as q)", str(cu.device))
    n = cu.shape[0] - 1
    if batch is not None and n != batch:
        raise InvalidInputError(name, f"{batch + 1} offsets (same batch as cu_seqlens_q)", f"{n + 1}")
    if not check_values:
        return n, None
    values = cu.tolist()  # one small device-to-host copy; skipped while capturing a CUDA graph
    if values[0] != 0:
        raise InvalidInputError(name, "first offset 0", str(values[0]))
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if any(length < 0 for length in lengths):
        bad = next(i for i, length in enumerate(lengths) if length < 0)
        raise InvalidInputError(name, "non-decreasing offsets", f"{values[bad]} then {values[bad + 1]} at index {bad}")
    if values[-1] != total:
        raise InvalidInputError(name, f"last offset equal to the token count {total}", str(values[-1]))
    return n, max(lengths, default=0)


def longest_sequence(cu: torch.Tensor) -> int:
    """The longest sequence of a varlen batch (one device-to-host copy)."""
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def _check_max_seqlen(name: str, given: int | None, longest: int | None, cu: torch.Tensor) -> int:
    if given is None:
        if longest is not None:
            return longest
        if cu.is_cuda and torch.cuda.is_current_stream_capturing():
            raise InvalidInputError(name, "an int (required while capturing a CUDA graph)", "None")
        return longest_sequence(cu)
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise InvalidInputError(name, "a non-negative int", repr(given))
    if longest is not None and given < longest:
        raise InvalidInputError(name, f"at least the longest sequence ({longest})", str(given))
    return given


def _check_descale(name: str, d: torch.Tensor | None, batch: int, heads: int, device: torch.device) -> Descale:
    if d is None:
        return "none"
    d = require_tensor(name, d)
    if d.dtype != torch.float32:
        raise InvalidInputError(name, "dtype torch.float32", str(d.dtype))
    if d.device != device:
        raise InvalidInputError(name, f"device {device}", str(d.device))
    if d.numel() == 1 and d.dim() <= 1:
        return "tensor"
    if tuple(d.shape) == (batch, heads):
        return "head"
    raise InvalidInputError(
        name, f"shape () or (1,) per tensor, or ({batch}, {heads}) per (batch, head)", f"shape {tuple(d.shape)}"
    )


def default_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The output's dtype when the caller names none: the inputs' own, bf16 for fp8 inputs."""
    return FP8_OUT_DTYPES[0] if dtype in FP8_DTYPES else dtype


def check_out_dtype(out_dtype: object, dtype: torch.dtype) -> torch.dtype | None:
    """Validate ``out_dtype`` for inputs of ``dtype``; None when it is the default (or not given)."""
    if out_dtype is None or out_dtype == default_out_dtype(dtype):
        return None
    if dtype in FP8_DTYPES:
        # fp8 outputs would need an output scale the kernels do not compute: refused, not approximated.
        expected = "None, torch.bfloat16 or torch.float16 for fp8 inputs (fp8 outputs are not supported)"
    else:
        expected = f"None or {dtype} (the inputs' dtype; other output dtypes are for fp8 inputs only)"
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FP8_OUT_DTYPES or dtype not in FP8_DTYPES:
        raise InvalidInputError("out_dtype", expected, repr(out_dtype))
    return out_dtype


def check_dropout_seed(seed: object) -> int:
    """The seed of a call with dropout: an int in [0, 2**63) (the mask is a pure function of it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError(
            "dropout_seed",
            "an int in [0, 2**63) when dropout_p > 0 (the mask is a pure function of the seed)",
            repr(seed),
        )
    return seed


def check_window(value: object, name: str = "window") -> tuple[int, int]:
    """Validate a ``(left, right)`` window; ``None`` means unbounded on both sides."""
    if value is None:
        return (UNBOUNDED, UNBOUNDED)
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise InvalidInputError(name, "a pair (left, right) of ints, -1 for unbounded", repr(value))
    left, right = pair
    if not (UNBOUNDED <= left <= MAX_REACH and UNBOUNDED <= right <= MAX_REACH):
        raise InvalidInputError(name, f"left and right in [0, {MAX_REACH}], or -1 for unbounded", repr(pair))
    return (left, right)


def check_sinks(sinks: object, heads_q: int, device: torch.device) -> bool:
    """Validate per-head sink logits: None, or float32 (heads_q,) on the queries' device."""
    if sinks is None:
        return False
    t = require_tensor("sinks", sinks)
    if t.dtype != torch.float32:
        raise InvalidInputError("sinks", "dtype torch.float32", str(t.dtype))
    if tuple(t.shape) != (heads_q,):
        raise InvalidInputError("sinks", f"shape ({heads_q},): one logit per query head", f"shape {tuple(t.shape)}")
    if t.device != device:
        raise InvalidInputError("sinks", f"device {device} (same as q)", str(t.device))
    return True


def check_sink_tokens(value: object, window: tuple[int, int]) -> int:
    """Validate ``sink_tokens``; it only matters with a bounded left reach, so it is 0 without one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REACH:
        raise InvalidInputError("sink_tokens", f"an int in [0, {MAX_REACH}]", repr(value))
    return value if window[0] != UNBOUNDED else 0


def _check_float(name: str, value: object, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(name, "a float", type(value).__name__)
    v = float(value)
    below = v < low if low_inclusive else v <= low
    if not math.isfinite(v) or below or v >= high:
        lo = f">= {low}" if low_inclusive else f"> {low}"
        hi = f" and < {high}" if math.isfinite(high) else ""
        raise InvalidInputError(name, f"a finite float {lo}{hi}", repr(value))
    return v


def check_factor(name: str, value: object, *, zero_allowed: bool) -> float:
    """A scale or softcap: a float the kernels' float32 arithmetic represents (0 allowed for softcap: off)."""
    v = _check_float(name, value, low=0.0, low_inclusive=zero_allowed)
    if v == 0.0 or MIN_FLOAT32_FACTOR <= v <= MAX_FLOAT32_FACTOR:
        return v
    zero = "0 (off) or " if zero_allowed else ""
    expected = f"{zero}a float in [{MIN_FLOAT32_FACTOR:.1e}, {MAX_FLOAT32_FACTOR:.1e}] (float32 arithmetic)"
    raise InvalidInputError(name, expected, repr(value))


def check_score_options(
    causal: object, window: object, softcap: object, scale: object, head_dim: int
) -> tuple[tuple[int, int], float, float]:
    """Validate the options that shape the scores; returns ``(window, softcap, scale)`` with the
    window as a pair and the default scale ``1 / sqrt(head_dim)`` filled in."""
    if not isinstance(causal, bool):
        raise InvalidInputError("causal", "a bool", repr(causal))
    window_pair = check_window(window)
    if causal and window_pair[1] not in (0, UNBOUNDED):
        raise InvalidInputError("window", "right reach 0 or -1 when causal=True", repr(window))
    softcap_v = check_factor("softcap", softcap, zero_allowed=True)
    scale_v = 1.0 / math.sqrt(head_dim) if scale is None else check_factor("scale", scale, zero_allowed=False)
    if softcap_v and not scale_v / softcap_v <= MAX_FLOAT32_FACTOR:
        raise InvalidInputError("softcap", f"a value with scale / softcap <= {MAX_FLOAT32_FACTOR:.0e}", repr(softcap))
    return window_pair, softcap_v, scale_v


_ARGUMENT_TYPES: dict[str, tuple[type, ...]] = {
    "causal": (bool,),
    "deterministic": (bool,),
    "return_lse": (bool,),
    "check_values": (bool, type(None)),
    "softcap": (int, float),
    "scale": (int, float, type(None)),
    "dropout_p": (int, float),
    "dropout_seed": (int, type(None)),
    "max_seqlen_q": (int, type(None)),
    "max_seqlen_k": (int, type(None)),
    "layout": (str,),
    "backend": (str,),
    "sink_tokens": (int,),
    "out_dtype": (torch.dtype, type(None)),
}


def check_argument_types(**arguments: object) -> None:
    """Reject arguments of the wrong Python type before they reach a ``torch.library`` op,
    whose argument parsing would coerce them (``causal=1`` to True) or fail with a C++ message.

    Values are checked later by :func:`build_spec`; this is only about types.
    """
    for name, value in arguments.items():
        if name in ("q", "k", "v"):
            require_tensor(name, value)
            continue
        if name in ("cu_seqlens_q", "cu_seqlens_k", "q_descale", "k_descale", "v_descale", "sinks"):
            if value is not None:
                require_tensor(name, value)
            continue
        allowed = _ARGUMENT_TYPES[name]
        numeric = bool not in allowed and isinstance(value, bool)  # a bool is an int, but not a number here
        if numeric or not isinstance(value, allowed):
            words = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise InvalidInputError(name, f"a {words}", f"{type(value).__name__} {value!r}")


# --------------------------------------------------------------------------- build_spec


def build_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "bshd",
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    deterministic: bool = False,
    check_values: bool | None = None,
    attn_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_mask: BlockMask | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    score_mod_grad: Callable[..., torch.Tensor] | None = None,
    mask_mod: Callable[..., torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,
    sink_tokens: int = 0,
) -> AttentionSpec:
    """Validate one attention call and describe it.

    ``check_values`` decides whether the checks that read tensor *values* (the offsets in
    ``cu_seqlens``: first 0, non-decreasing, last equal to the token count) run. They need a
    device-to-host copy when the offsets live on a GPU, which stalls the host, so the default
    (``None``) runs them only where they cost no synchronisation: offsets in CPU memory
    (:func:`value_checks`). ``True`` forces them (one copy per call), ``False`` skips them; they
    never run while a CUDA graph is captured. Kernels never rely on them for memory safety: they
    clamp every offset they read. A missing ``max_seqlen_*`` is read from the offsets, which is a
    copy too: pass it to keep a varlen step free of host synchronisation.
    """
    q = require_tensor("q", q)
    k = require_tensor("k", k)
    v = require_tensor("v", v)
    if layout not in LAYOUTS:
        raise InvalidInputError("layout", f"one of {LAYOUTS}", repr(layout))
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given = "cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k"
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise InvalidInputError(missing, f"a tensor, since {given} was given (varlen needs both)", "None")
    varlen = cu_seqlens_q is not None
    for name, length in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not varlen and length is not None:
            raise InvalidInputError(name, "None unless cu_seqlens_q/cu_seqlens_k are given", repr(length))

    want_dim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want_dim:
            raise InvalidInputError(name, f"a {want_dim}-D tensor {_layout_words(layout, varlen)}", describe_tensor(t))
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise InvalidInputError(name, f"one of the dtypes {names}", str(t.dtype))
        check_unit_last_stride(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidInputError(name, f"dtype {q.dtype} (same as q)", str(t.dtype))
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (same as q)", str(t.device))
    if k.shape != v.shape:
        raise InvalidInputError("v", f"shape {tuple(k.shape)} (same as k)", f"shape {tuple(v.shape)}")

    batch, seqlen_q, heads_q, head_dim = _dims(q, layout, varlen)
    batch_k, seqlen_k, heads_kv, head_dim_k = _dims(k, layout, varlen)
    if head_dim_k != head_dim:
        raise InvalidInputError("k", f"head_dim {head_dim} (same as q)", f"head_dim {head_dim_k}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise InvalidInputError("q", f"head_dim between 1 and {MAX_HEAD_DIM}", f"head_dim {head_dim}")
    if heads_q < 1:
        raise InvalidInputError("q", "at least one head", f"{heads_q} heads")
    if heads_kv < 1 or heads_q % heads_kv:
        raise InvalidInputError(
            "k", f"a number of heads that divides q's {heads_q} heads (GQA/MQA)", f"{heads_kv} heads"
        )
    if batch_k != batch:
        raise InvalidInputError("k", f"batch {batch} (same as q)", f"batch {batch_k}")

    total_q, total_k = batch * seqlen_q, batch * seqlen_k
    if varlen:
        total_q, total_k = seqlen_q, seqlen_k
        check = value_checks(q.device) if check_values is None else check_values
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            check = False  # a capture cannot copy to the host
        cu_q = require_tensor("cu_seqlens_q", cu_seqlens_q)
        cu_k = require_tensor("cu_seqlens_k", cu_seqlens_k)
        batch, longest_q = _check_cu_seqlens("cu_seqlens_q", cu_q, None, total_q, q.device, check)
        _, longest_k = _check_cu_seqlens("cu_seqlens_k", cu_k, batch, total_k, q.device, check)
        seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q, cu_q)
        seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k, cu_k)

    window_pair, softcap_v, scale_v = check_score_options(causal, window, softcap, scale, head_dim)
    dropout_v = _check_float("dropout_p", dropout_p, low=0.0, low_inclusive=True, high=1.0)
    seed = check_dropout_seed(dropout_seed) if dropout_v > 0.0 else 0
    if not isinstance(deterministic, bool):
        raise InvalidInputError("deterministic", "a bool", repr(deterministic))
    has_sinks = check_sinks(sinks, heads_q, q.device)
    sink_count = check_sink_tokens(sink_tokens, window_pair)

    is_fp8 = q.dtype in FP8_DTYPES
    descales = (
        ("q_descale", q_descale, heads_q),
        ("k_descale", k_descale, heads_kv),
        ("v_descale", v_descale, heads_kv),
    )
    if not is_fp8:
        for name, d, _ in descales:
            if d is not None:
                raise InvalidInputError(name, "None unless q, k, v are fp8", "a tensor")
        descale: Descale = "none"
    else:
        kinds = {_check_descale(name, d, batch, heads, q.device) for name, d, heads in descales}
        kinds.discard("none")
        if len(kinds) > 1:
            raise InvalidInputError("q_descale", "all descale factors per tensor, or all per head", "a mix")
        descale = kinds.pop() if kinds else "none"
    chosen_out_dtype = check_out_dtype(out_dtype, q.dtype)

    extras = check_mask_arguments(
        batch=batch, heads=heads_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k, device=q.device, varlen=varlen,
        attn_mask=attn_mask, alibi_slopes=alibi_slopes, block_mask=block_mask, score_mod=score_mod,
        score_mod_grad=score_mod_grad, mask_mod=mask_mod,
    )  # fmt: skip
    return AttentionSpec(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        dtype=q.dtype,
        device=q.device,
        layout=layout,  # type: ignore[arg-type]
        varlen=varlen,
        total_q=total_q,
        total_k=total_k,
        causal=causal,
        window=window_pair,
        softcap=softcap_v,
        scale=scale_v,
        dropout_p=dropout_v,
        dropout_seed=seed,
        deterministic=deterministic,
        descale=descale,
        q_strides=_canonical_strides(q, layout, varlen),
        k_strides=_canonical_strides(k, layout, varlen),
        v_strides=_canonical_strides(v, layout, varlen),
        aligned16=is_aligned16([q, k, v]),
        mask=extras.mask,
        alibi=extras.alibi,
        block_mask=extras.block_mask,
        score_mod=extras.score_mod,
        score_mod_grad=extras.score_mod_grad,
        mask_mod=extras.mask_mod,
        sinks=has_sinks,
        sink_tokens=sink_count,
        chosen_out_dtype=chosen_out_dtype,
    )


def canonical(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """View a caller's q/k/v/out/grad tensor in (batch, seqlen, heads, head_dim) order. Never copies.

    A varlen tensor becomes batch 1 of all tokens.
    """
    if spec.varlen:
        t = t if spec.layout == "bshd" else t.transpose(0, 1)
        return t.unsqueeze(0)
    return t if spec.layout == "bshd" else t.transpose(1, 2)


def canonical_lse(lse: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """View an LSE tensor as (batch, heads, seqlen_q); varlen (heads, total) becomes (1, heads, total)."""
    return lse.unsqueeze(0) if spec.varlen else lse
