"""The KV-cache spec: what one decoding call against a cache is, and what is valid.

:func:`build_kv_spec` turns the tensors and options of :func:`flash.attention_with_kvcache` into
an immutable, hashable :class:`KVCacheSpec`, rejecting anything out of the spec with an
:class:`~flash.errors.InvalidInputError` that names the argument, before any kernel runs.

A cache is *contiguous*, (cache_batch, capacity, heads_kv, head_dim), or *paged*,
(num_pages, page_size, heads_kv, head_dim) with a ``block_table`` (batch, max_pages) of page
numbers: key ``j`` of sequence ``b`` lives in page ``block_table[b, j // page_size]``, slot
``j % page_size``. A contiguous cache is the paged one with a single page per sequence (row
``b``, or ``cache_batch_idx[b]``), which is how the kernels see it.

Sequence ``b`` holds ``L = cache_seqlens[b]`` keys before the call; the ``seqlen_new`` new keys
are appended at positions ``L .. L + seqlen_new - 1``, and the queries attend to all
``L + seqlen_new`` keys, bottom-right aligned (:mod:`flash.masking`): query ``i`` sits at
position ``L + seqlen_new - seqlen_q + i``. Rotary embeddings use these positions.

Values that only the device knows (lengths, page numbers, batch indices) are checked where that
costs no synchronisation (CPU tensors, or ``check_values=True``; never while a CUDA graph is
captured, see :func:`check_cache_values`). Unchecked, every backend clamps them the same
documented way, so no access leaves the tensors:

* ``L`` is clamped into ``[0, capacity - seqlen_new]``;
* a page number into ``[0, num_pages - 1]``, a ``cache_batch_idx`` entry into ``[0, cache_batch - 1]``;
* a rotary position into ``[0, rotary_positions - 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from flash.errors import InvalidInputError
from flash.spec import (
    FP8_DTYPES,
    KERNEL_DTYPES,
    MAX_HEAD_DIM,
    REFERENCE_DTYPES,
    UNBOUNDED,
    Scores,
    check_score_options,
    check_sink_tokens,
    check_sinks,
    check_unit_last_stride,
    describe_tensor,
    is_aligned16,
    require_tensor,
    value_checks,
)

Rotary = Literal["none", "half", "interleaved"]
QUERY_DTYPES = KERNEL_DTYPES + REFERENCE_DTYPES
#: Keys per page of a paged cache.
MAX_PAGE_SIZE = 256
#: Most parts the keys of one call may be split into.
MAX_SPLITS = 256


@dataclass(frozen=True)
class KVCacheSpec(Scores):
    """One validated KV-cache call. Immutable and hashable (the key of its plan)."""

    batch: int
    seqlen_q: int  # new queries per sequence
    seqlen_new: int  # new keys/values appended per sequence (0: nothing appended)
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype  # of q, of the new k/v and of the output
    cache_dtype: torch.dtype  # the caches' own: dtype, or fp8
    device: torch.device
    paged: bool
    page_size: int  # keys per page; the capacity for a contiguous cache
    pages: int  # pages in the pool; rows of a contiguous cache
    capacity: int  # keys one sequence can hold
    batch_idx: bool  # cache_batch_idx maps sequences to cache rows
    causal: bool
    window: tuple[int, int]
    softcap: float
    scale: float
    sinks: bool
    sink_tokens: int
    rotary: Rotary
    rotary_dim: int  # leading head-dim elements rotated (0 without rotary)
    rotary_positions: int  # rows of rotary_cos/rotary_sin
    descale: bool  # fp8 cache with k_descale/v_descale factors
    num_splits: int  # parts the keys are split into (resolved: user's value or the heuristic's)
    aligned16: bool
    token_stride: int  # the caches' largest stride between a page's slots (elements)

    @property
    def is_fp8(self) -> bool:
        """True for an fp8 cache."""
        return self.cache_dtype in FP8_DTYPES

    @property
    def out_dtype(self) -> torch.dtype:
        """The output's dtype: the queries' own."""
        return self.dtype

    @property
    def empty(self) -> bool:
        """True when there is nothing at all to do (no sequence)."""
        return self.batch == 0

    def lse_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.heads_q, self.seqlen_q)

    def features(self) -> frozenset[str]:
        """Names of the non-default options this call uses (:data:`flash.backend.DECODE_FEATURES`)."""
        flags = {
            "causal": self.causal,
            "window": self.window != (UNBOUNDED, UNBOUNDED),
            "softcap": bool(self.softcap),
            "gqa": self.heads_q != self.heads_kv,
            "fp8": self.is_fp8,
            "sinks": self.sinks,
            "sink_tokens": bool(self.sink_tokens),
            "paged": self.paged,
            "append": bool(self.seqlen_new),
            "rotary": self.rotary != "none",
            "cache_batch_idx": self.batch_idx,
        }
        return frozenset(name for name, used in flags.items() if used)

    def limit_sizes(self) -> tuple[int, int, int, int]:
        """(batch, heads, keys per sequence, the caches' slot stride) for :class:`~flash.backend.Limits`."""
        return self.batch, self.heads_q, self.capacity, self.token_stride

    def describe(self) -> str:
        """One line naming the call, for messages."""
        cache = f"paged {self.pages}x{self.page_size}" if self.paged else f"cache {self.pages}x{self.capacity}"
        parts = [
            str(self.dtype).replace("torch.", ""),
            f"{self.device}",
            f"batch {self.batch}",
            f"{self.seqlen_q} queries, {self.seqlen_new} new keys, {cache} ({self.capacity} keys per sequence)",
            f"heads {self.heads_q}/{self.heads_kv}",
            f"head_dim {self.head_dim}",
            f"{self.num_splits} splits",
        ]
        return ", ".join(parts + sorted(self.features()))


# --------------------------------------------------------------------------- helpers


def _int32_tensor(name: str, t: object, shape: tuple[int, ...], words: str, device: torch.device) -> torch.Tensor:
    t = require_tensor(name, t)
    if t.dtype != torch.int32:
        raise InvalidInputError(name, "dtype torch.int32", str(t.dtype))
    if tuple(t.shape) != shape:
        raise InvalidInputError(name, f"shape {shape} {words}", f"shape {tuple(t.shape)}")
    if t.device != device:
        raise InvalidInputError(name, f"device {device} (same as q)", str(t.device))
    return t


def _check_4d(name: str, t: object, words: str) -> torch.Tensor:
    t = require_tensor(name, t)
    if t.dim() != 4:
        raise InvalidInputError(name, f"a 4-D tensor {words}", describe_tensor(t))
    check_unit_last_stride(name, t)
    return t


def _check_kv_descale(name: str, d: object, batch: int, heads_kv: int, device: torch.device) -> None:
    d = require_tensor(name, d)
    if d.dtype != torch.float32:
        raise InvalidInputError(name, "dtype torch.float32", str(d.dtype))
    if d.device != device:
        raise InvalidInputError(name, f"device {device}", str(d.device))
    if tuple(d.shape) not in ((), (1,), (heads_kv,), (batch, heads_kv)):
        expected = f"shape () per tensor, ({heads_kv},) per head or ({batch}, {heads_kv}) per sequence and head"
        raise InvalidInputError(name, expected, f"shape {tuple(d.shape)}")


def _check_rotary(
    cos: object, sin: object, interleaved: object, q: torch.Tensor, head_dim: int
) -> tuple[Rotary, int, int]:
    if not isinstance(interleaved, bool):
        raise InvalidInputError("rotary_interleaved", "a bool", repr(interleaved))
    if cos is None and sin is None:
        return "none", 0, 0
    if cos is None or sin is None:
        missing = "rotary_cos" if cos is None else "rotary_sin"
        raise InvalidInputError(missing, "a tensor, since the other rotary table was given", "None")
    cos_t, sin_t = require_tensor("rotary_cos", cos), require_tensor("rotary_sin", sin)
    if cos_t.dim() != 2 or cos_t.shape[1] < 1 or 2 * cos_t.shape[1] > head_dim:
        expected = f"shape (positions, rotary_dim / 2) with rotary_dim <= head_dim {head_dim}"
        raise InvalidInputError("rotary_cos", expected, f"shape {tuple(cos_t.shape)}")
    if sin_t.shape != cos_t.shape or sin_t.dtype != cos_t.dtype:
        raise InvalidInputError(
            "rotary_sin", f"shape {tuple(cos_t.shape)}, dtype {cos_t.dtype} (as rotary_cos)", describe_tensor(sin_t)
        )
    if cos_t.dtype not in (torch.float32, q.dtype):
        raise InvalidInputError("rotary_cos", f"dtype torch.float32 or {q.dtype} (as q)", str(cos_t.dtype))
    for name, t in (("rotary_cos", cos_t), ("rotary_sin", sin_t)):
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (same as q)", str(t.device))
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise InvalidInputError(name, "unit stride in the last dimension (call .contiguous())", str(t.stride()))
    return ("interleaved" if interleaved else "half"), 2 * cos_t.shape[1], cos_t.shape[0]


def _check_num_splits(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SPLITS:
        raise InvalidInputError("num_splits", f"None (automatic) or an int in [1, {MAX_SPLITS}]", repr(value))
    return value


def checks_enabled(device: torch.device, check_values: bool | None) -> bool:
    """Whether this call's value checks run: where they cost no sync unless told, never while capturing."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return value_checks(device) if check_values is None else check_values


# --------------------------------------------------------------------------- build_kv_spec


def build_kv_spec(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | int,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sink_tokens: int = 0,
    num_splits: int | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> KVCacheSpec:
    """Validate one KV-cache call's shapes, dtypes, devices and options (never tensor values:
    :func:`check_cache_values` does that) and describe it; ``num_splits=None`` is resolved by
    :func:`flash.heuristics.decode.num_splits`."""
    from flash.heuristics.decode import num_splits as default_splits

    q = _check_4d("q", q, "(batch, seqlen_q, heads_q, head_dim)")
    if q.dtype not in QUERY_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in QUERY_DTYPES)
        raise InvalidInputError("q", f"one of the dtypes {names}", str(q.dtype))
    batch, seqlen_q, heads_q, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise InvalidInputError("q", f"head_dim between 1 and {MAX_HEAD_DIM}", f"head_dim {head_dim}")
    if heads_q < 1:
        raise InvalidInputError("q", "at least one head", f"{heads_q} heads")
    paged = block_table is not None
    cache_words = (
        "(num_pages, page_size, heads_kv, head_dim)" if paged else "(cache_batch, capacity, heads_kv, head_dim)"
    )
    k_cache = _check_4d("k_cache", k_cache, cache_words)
    v_cache = _check_4d("v_cache", v_cache, cache_words)
    if k_cache.dtype not in (q.dtype, *FP8_DTYPES):
        raise InvalidInputError("k_cache", f"dtype {q.dtype} (as q) or an fp8 dtype", str(k_cache.dtype))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise InvalidInputError(name, f"device {q.device} (same as q)", str(t.device))
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise InvalidInputError(
            "v_cache", f"shape {tuple(k_cache.shape)}, dtype {k_cache.dtype} (as k_cache)", describe_tensor(v_cache)
        )
    pages, slots, heads_kv, head_dim_k = k_cache.shape
    if head_dim_k != head_dim:
        raise InvalidInputError("k_cache", f"head_dim {head_dim} (as q)", f"head_dim {head_dim_k}")
    if heads_kv < 1 or heads_q % heads_kv:
        raise InvalidInputError(
            "k_cache", f"a number of heads that divides q's {heads_q} heads (GQA/MQA)", f"{heads_kv} heads"
        )

    if paged:
        if cache_batch_idx is not None:
            raise InvalidInputError("cache_batch_idx", "None with a block_table (the table maps sequences)", "a tensor")
        table = require_tensor("block_table", block_table)
        if table.dim() != 2:
            raise InvalidInputError("block_table", "a 2-D int32 tensor (batch, max_pages)", describe_tensor(table))
        table = _int32_tensor("block_table", table, (batch, table.shape[1]), "(batch, max_pages)", q.device)
        if not 1 <= slots <= MAX_PAGE_SIZE:
            raise InvalidInputError("k_cache", f"pages of 1 to {MAX_PAGE_SIZE} keys (dim 1)", f"page_size {slots}")
        if pages < 1 or table.shape[1] < 1:
            raise InvalidInputError(
                "block_table", "at least one page in the pool and in the table", describe_tensor(table)
            )
        page_size, capacity = slots, table.shape[1] * slots
    else:
        if cache_batch_idx is None and pages != batch:
            raise InvalidInputError("k_cache", f"{batch} rows (one per sequence; or pass cache_batch_idx)", f"{pages}")
        if cache_batch_idx is not None:
            _int32_tensor("cache_batch_idx", cache_batch_idx, (batch,), "(batch,)", q.device)
            if pages < 1:
                raise InvalidInputError("k_cache", "at least one row to map sequences to", f"{pages} rows")
        page_size = capacity = slots

    seqlen_new = 0
    if (k is None) != (v is None):
        missing = "v" if v is None else "k"
        raise InvalidInputError(missing, "a tensor, since the other new tensor was given", "None")
    if k is not None and v is not None:
        words = "(batch, seqlen_new, heads_kv, head_dim)"
        k, v = _check_4d("k", k, words), _check_4d("v", v, words)
        want = (batch, k.shape[1], heads_kv, head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want or t.dtype != q.dtype or t.device != q.device:
                raise InvalidInputError(name, f"shape {want}, dtype {q.dtype}, device {q.device}", describe_tensor(t))
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise InvalidInputError("k", f"at most {capacity} new keys (the cache's capacity)", f"{seqlen_new}")

    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise InvalidInputError("cache_seqlens", "an int or an int32 tensor (batch,)", type(cache_seqlens).__name__)
    if isinstance(cache_seqlens, torch.Tensor):
        _int32_tensor("cache_seqlens", cache_seqlens, (batch,), "(batch,)", q.device)
    else:
        check_length(cache_seqlens, capacity, seqlen_new)

    window_pair, softcap_v, scale_v = check_score_options(causal, window, softcap, scale, head_dim)
    has_sinks = check_sinks(sinks, heads_q, q.device)
    sink_count = check_sink_tokens(sink_tokens, window_pair)
    rotary, rotary_dim, rotary_positions = _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, head_dim)
    splits = _check_num_splits(num_splits)

    fp8 = k_cache.dtype in FP8_DTYPES
    for name, d in (("k_descale", k_descale), ("v_descale", v_descale)):
        if d is not None and not fp8:
            raise InvalidInputError(name, "None unless the caches are fp8", "a tensor")
        if d is not None:
            _check_kv_descale(name, d, batch, heads_kv, q.device)
    if (k_descale is None) != (v_descale is None):
        missing = "v_descale" if v_descale is None else "k_descale"
        raise InvalidInputError(missing, "a tensor, since the other descale factor was given", "None")

    if splits is None:
        splits = default_splits(batch, heads_kv, capacity, q.device)
    tensors = [t for t in (q, k_cache, v_cache, k, v) if t is not None]
    return KVCacheSpec(
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_new=seqlen_new,
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        dtype=q.dtype,
        cache_dtype=k_cache.dtype,
        device=q.device,
        paged=paged,
        page_size=page_size,
        pages=pages,
        capacity=capacity,
        batch_idx=cache_batch_idx is not None,
        causal=bool(causal),
        window=window_pair,
        softcap=softcap_v,
        scale=scale_v,
        sinks=has_sinks,
        sink_tokens=sink_count,
        rotary=rotary,
        rotary_dim=rotary_dim,
        rotary_positions=rotary_positions,
        descale=k_descale is not None,
        num_splits=splits,
        aligned16=is_aligned16(tensors),
        token_stride=max(k_cache.stride(1), v_cache.stride(1)),
    )


# --------------------------------------------------------------------------- value checks


def check_length(length: int, capacity: int, seqlen_new: int) -> None:
    """An int ``cache_seqlens``: room for the new keys must remain."""
    if not 0 <= length <= capacity - seqlen_new:
        extra = f" ({seqlen_new} slots kept for the new keys)" if seqlen_new else ""
        expected = f"a length in [0, {capacity - seqlen_new}]: sequences hold at most {capacity} keys{extra}"
        raise InvalidInputError("cache_seqlens", expected, str(length))


def check_cache_values(
    spec: KVCacheSpec,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
) -> None:
    """Check the values only the tensors know: lengths within the capacity (room for the new keys
    included), rotary tables long enough, the page numbers a sequence uses inside the pool, batch
    indices inside the cache and distinct when keys are appended (two sequences would write the
    same slots). One device-to-host copy per tensor when they live on a GPU."""
    lengths = cache_seqlens.tolist()
    for b, length in enumerate(lengths):
        try:
            check_length(length, spec.capacity, spec.seqlen_new)
        except InvalidInputError as error:
            raise InvalidInputError("cache_seqlens", error.expected, f"{length} at index {b}") from None
    if spec.rotary != "none" and lengths:
        longest = max(lengths) + spec.seqlen_new
        if longest > spec.rotary_positions:
            raise InvalidInputError(
                "rotary_cos", f"at least {longest} positions (the longest sequence)", f"{spec.rotary_positions}"
            )
    if block_table is not None:
        rows = block_table.tolist()
        for b, length in enumerate(lengths):
            used = -(-(length + spec.seqlen_new) // spec.page_size)
            for index, page in enumerate(rows[b][:used]):
                if not 0 <= page < spec.pages:
                    expected = f"page numbers in [0, {spec.pages - 1}] for the pages sequence {b} uses"
                    raise InvalidInputError("block_table", expected, f"{page} at [{b}, {index}]")
    if cache_batch_idx is not None:
        indices = cache_batch_idx.tolist()
        for b, row in enumerate(indices):
            if not 0 <= row < spec.pages:
                raise InvalidInputError(
                    "cache_batch_idx", f"cache rows in [0, {spec.pages - 1}]", f"{row} at index {b}"
                )
        if spec.seqlen_new and len(set(indices)) != len(indices):
            raise InvalidInputError("cache_batch_idx", "distinct rows when new keys are appended", str(indices))
