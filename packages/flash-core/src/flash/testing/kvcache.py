"""Conformance of the KV-cache pass: cases, random caches, an independent float64 oracle, the checks.

:func:`check_kvcache` runs :func:`flash.attention_with_kvcache` on a backend with outputs poisoned
with NaN and caches placed between NaN guard regions, then holds it to three rules:

* the appended slots hold the new keys and values (rotated, and quantised for an fp8 cache)
  within half a unit in the last place of the cache dtype of the float64 values;
* every other byte of the caches (their unused slots and unused pages hold NaN: garbage that
  must never reach a result), of the guard regions and of the inputs is unchanged;
* output and LSE are within the tolerance rule (:func:`flash.testing.assert_within_rule`) of the float64
  oracle, computed sequence by sequence with plain Python page lookups and
  :func:`flash.reference.oracle.dense_attention` over the keys the cache holds after the call, a
  computation that shares nothing with the backends but the dense oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import flash
from flash.reference.oracle import dense_attention
from flash.spec import FP8_DTYPES, build_spec
from flash.testing.conformance import naive_dtype, poisoned_outputs
from flash.testing.tolerance import assert_within_rule

GUARD = 64  # elements of NaN before and after each cache


@dataclass(frozen=True)
class KVCase:
    """One KV-cache problem: shapes and options (caches hold NaN wherever nothing was written)."""

    name: str
    lengths: tuple[int, ...] = (5, 0, 17)  # keys cached per sequence before the call
    capacity: int = 40  # keys a sequence can hold (rounded up to whole pages when paged)
    seqlen_q: int = 1
    seqlen_new: int = 1  # 0: nothing appended
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 32
    dtype: torch.dtype = torch.float16
    cache_dtype: torch.dtype | None = None  # None: q's dtype
    page_size: int | None = None  # paged cache with this many keys per page
    batch_idx: bool = False  # sequences live in a larger cache, in shuffled rows
    strided: bool = False  # caches as views of a (rows, heads, slots, padded head_dim) buffer
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    rotary: str = "none"  # "half" or "interleaved"
    rotary_dim: int | None = None  # default: head_dim
    sinks: bool = False
    sink_tokens: int = 0
    num_splits: int | None = None
    descale: str = "head"  # fp8 caches: "tensor", "head" (heads_kv,) or "batch" (batch, heads_kv)
    #: Cached keys and values that hold NaN, counted back from each sequence's end after the call
    #: (8: position ``L + seqlen_new - 8``): rows that do not see them must not notice.
    nan_back: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default=())

    @property
    def batch(self) -> int:
        return len(self.lengths)


@dataclass
class KVInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    options: dict[str, Any]  # every keyword argument of attention_with_kvcache but return_lse/backend
    buffers: tuple[torch.Tensor, torch.Tensor]  # the caches' guarded storage


def _pages_per_sequence(case: KVCase) -> int:
    return -(-case.capacity // case.page_size) if case.page_size else 1


def _guarded_cache(case: KVCase, rows: int, slots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cache_dtype = case.cache_dtype or case.dtype
    d = case.head_dim
    inner = (rows, case.heads_kv, slots, d + 8) if case.strided else (rows, slots, case.heads_kv, d)
    count = math.prod(inner)
    buffer = torch.full((count + 2 * GUARD,), float("nan"), dtype=torch.float32, device=device).to(cache_dtype)
    view = buffer[GUARD : GUARD + count].view(inner)
    if case.strided:
        view = view.transpose(1, 2)[..., :d]
    return view, buffer


def make_kv_inputs(case: KVCase, device: torch.device | str, seed: int) -> KVInputs:
    """Fresh random inputs for ``case``: cached keys random where a sequence holds them, NaN elsewhere."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, hq, hkv, d = case.batch, case.heads_q, case.heads_kv, case.head_dim
    work = torch.float32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=work)

    options: dict[str, Any] = {"causal": case.causal, "softcap": case.softcap, "sink_tokens": case.sink_tokens}
    if case.window is not None:
        options["window"] = case.window
    if case.num_splits is not None:
        options["num_splits"] = case.num_splits
    per_seq = _pages_per_sequence(case)
    if case.page_size:
        pool = batch * per_seq + 3
        k_cache, k_buf = _guarded_cache(case, pool, case.page_size, device)
        v_cache, v_buf = _guarded_cache(case, pool, case.page_size, device)
        order = torch.randperm(pool, generator=gen, device=device)[: batch * per_seq].view(batch, per_seq)
        table = order.to(torch.int32).clone()
        options["block_table"] = table
    else:
        rows = batch + 2 if case.batch_idx else batch
        k_cache, k_buf = _guarded_cache(case, rows, case.capacity, device)
        v_cache, v_buf = _guarded_cache(case, rows, case.capacity, device)
        if case.batch_idx:
            options["cache_batch_idx"] = torch.randperm(rows, generator=gen, device=device)[:batch].to(torch.int32)
    lengths = torch.tensor(case.lengths, dtype=torch.int32, device=device)
    options["cache_seqlens"] = lengths
    capacity = per_seq * case.page_size if case.page_size else case.capacity
    for b, length in enumerate(case.lengths):
        pages, slots = _rows(options, b, length, case.page_size, device)
        k_cache[pages, slots] = randn(length, hkv, d).to(k_cache.dtype)
        v_cache[pages, slots] = randn(length, hkv, d).to(v_cache.dtype)
        for back in case.nan_back:
            if 0 <= length + case.seqlen_new - back < length:
                page, slot = _locate(options, b, length + case.seqlen_new - back, case.page_size)
                k_cache[page, slot] = float("nan")
                v_cache[page, slot] = float("nan")
        if case.page_size:  # the table's entries past the pages a sequence uses: padding, never read
            used = -(-(length + case.seqlen_new) // case.page_size)
            options["block_table"][b, used:] = -1
    q = randn(batch, case.seqlen_q, hq, d).to(case.dtype)
    k = v = None
    if case.seqlen_new:
        k = randn(batch, case.seqlen_new, hkv, d).to(case.dtype)
        v = randn(batch, case.seqlen_new, hkv, d).to(case.dtype)
    if case.rotary != "none":
        half = (case.rotary_dim or d) // 2
        positions = capacity + 3
        inv = 10000.0 ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
        angles = torch.arange(positions, device=device, dtype=torch.float64)[:, None] * inv[None, :]
        options["rotary_cos"], options["rotary_sin"] = angles.cos().float(), angles.sin().float()
        options["rotary_interleaved"] = case.rotary == "interleaved"
    if case.sinks:
        options["sinks"] = randn(hq)
    if (case.cache_dtype or case.dtype) in FP8_DTYPES:
        shape = {"tensor": (), "head": (hkv,), "batch": (batch, hkv)}[case.descale]
        for name in ("k_descale", "v_descale"):
            options[name] = torch.rand(shape, generator=gen, device=device) + 0.5
    return KVInputs(q, k_cache, v_cache, k, v, options, (k_buf, v_buf))


def _rows(
    options: dict[str, Any], b: int, length: int, page_size: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages or cache rows, slots) of keys ``0 .. length - 1`` of sequence ``b``: plain indexing."""
    positions = torch.arange(length, device=device)
    if page_size:
        return options["block_table"][b].long()[positions // page_size], positions % page_size
    index = options.get("cache_batch_idx")
    row = int(index[b]) if index is not None else b
    return torch.full_like(positions, row), positions


def _locate(options: dict[str, Any], b: int, position: int, page_size: int | None) -> tuple[int, int]:
    """(page or cache row, slot) of key ``position`` of sequence ``b``, by plain Python lookups."""
    if page_size:
        return int(options["block_table"][b, position // page_size]), position % page_size
    index = options.get("cache_batch_idx")
    return (int(index[b]) if index is not None else b), position


def _factor(options: dict[str, Any], name: str, b: int, heads_kv: int) -> torch.Tensor:
    """The descale factors of sequence ``b``, (heads_kv, 1) (ones without an fp8 cache)."""
    d = options.get(name)
    if d is None:
        return torch.ones(heads_kv, 1, dtype=torch.float64)
    d = d.double()
    return (d[b] if d.dim() == 2 else d.reshape(-1).expand(heads_kv))[:, None]


def _rotated(x: torch.Tensor, options: dict[str, Any], positions: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``x`` (tokens, heads, d) rotated at ``positions`` in ``dtype`` arithmetic, as complex products."""
    cos, sin = options.get("rotary_cos"), options.get("rotary_sin")
    if cos is None or sin is None:
        return x.to(dtype)
    half = cos.shape[1]
    where = torch.tensor([min(max(p, 0), cos.shape[0] - 1) for p in positions], device=x.device)
    c, s = cos[where].to(dtype)[:, None, :], sin[where].to(dtype)[:, None, :]
    head = x[..., : 2 * half].to(dtype)
    if options.get("rotary_interleaved"):
        a, b = head[..., 0::2], head[..., 1::2]
        turned = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = head[..., :half], head[..., half:]
        turned = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((turned, x[..., 2 * half :].to(dtype)), dim=-1)


def _check_appended(case: KVCase, inputs: KVInputs, before: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Appended slots hold the rotated (quantised) new keys and values; every other byte is unchanged."""
    opts = inputs.options
    untouched = [torch.ones(c.shape[:2], dtype=torch.bool, device=c.device) for c in before]
    pairs = (("k", inputs.k, inputs.k_cache, before[0], untouched[0]),
             ("v", inputs.v, inputs.v_cache, before[1], untouched[1]))  # fmt: skip
    for name, new, cache, old, keep in pairs:
        if new is None:
            continue
        tiny = torch.finfo(cache.dtype).tiny
        eps = torch.finfo(cache.dtype).eps
        for b, length in enumerate(case.lengths):
            positions = list(range(length, length + case.seqlen_new))
            want = _rotated(new[b], opts, positions, torch.float64) if name == "k" else new[b].double()
            want = want / _factor(opts, f"{name}_descale", b, case.heads_kv).to(want.device)
            for t, position in enumerate(positions):
                page, slot = _locate(opts, b, position, case.page_size)
                got = cache[page, slot].double()
                err = (got - want[t]).abs()
                if not bool((err <= eps * want[t].abs() + tiny).all()):
                    where = f"appended {name} of sequence {b} at {position}"
                    raise AssertionError(f"{case.name}: {where}: off by {err.max()}")
                keep[page, slot] = False
        if not torch.equal(_bits(cache)[keep], _bits(old)[keep]):
            raise AssertionError(f"{case.name}: {name}_cache changed outside the appended slots")
    for buffer in inputs.buffers:
        guards = torch.cat((buffer[:GUARD], buffer[-GUARD:])).float()
        if not bool(guards.isnan().all()):
            raise AssertionError(f"{case.name}: a write landed outside the caches")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of each element (NaN payloads compare equal to themselves)."""
    return t.contiguous().view(torch.uint8).view(*t.shape, t.element_size())


def kv_oracle(case: KVCase, inputs: KVInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over what the caches hold after the call, sequence by sequence, computed in
    ``dtype`` (float64: the oracle; the inputs' own precision: the naive computation)."""
    opts = inputs.options
    hq, d, new = case.heads_q, case.head_dim, case.seqlen_new
    store = naive_dtype(case.dtype) if dtype != torch.float64 else torch.float64
    outs, lses = [], []
    for b, cached in enumerate(case.lengths):
        length = min(max(cached, 0), _pages_per_sequence(case) * (case.page_size or case.capacity) - new) + new
        pages, slots = _rows(opts, b, length, case.page_size, inputs.q.device)
        k_scale = _factor(opts, "k_descale", b, case.heads_kv).to(inputs.q.device)
        v_scale = _factor(opts, "v_descale", b, case.heads_kv).to(inputs.q.device)
        k = (inputs.k_cache[pages, slots].double() * k_scale).to(store)[None]
        v = (inputs.v_cache[pages, slots].double() * v_scale).to(store)[None]
        q = _rotated(inputs.q[b], opts, [length - case.seqlen_q + i for i in range(case.seqlen_q)], store)[None]
        spec = build_spec(
            q, k, v, causal=case.causal, window=case.window, softcap=case.softcap, sinks=opts.get("sinks"),
            sink_tokens=case.sink_tokens,
        )  # fmt: skip
        out, lse = dense_attention(spec, q, k, v, compute_dtype=dtype, sinks=opts.get("sinks"))
        outs.append(out)
        lses.append(lse)
    empty_out = inputs.q.new_zeros((0, case.seqlen_q, hq, d), dtype=dtype)
    return (torch.cat(outs) if outs else empty_out), (torch.cat(lses) if lses else empty_out[..., 0].transpose(1, 2))


def run_kvcache(backend: str, inputs: KVInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The call under test, with poisoned outputs."""
    with poisoned_outputs():
        out, lse = flash.attention_with_kvcache(
            inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v, backend=backend, return_lse=True,
            **inputs.options,
        )  # fmt: skip
    return out, lse


def kv_declared_reasons(backend: str, case: KVCase, device: torch.device | str) -> list[str]:
    """Why ``backend`` declares it cannot run ``case`` (empty: it must pass)."""
    from flash import dispatch
    from flash.kvspec import build_kv_spec

    inputs = make_kv_inputs(case, device, seed=0)
    options = {name: value for name, value in inputs.options.items()}
    spec = build_kv_spec(inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v, **options)
    return dispatch.rejection_reasons(backend, spec, "decode")


def check_kvcache(backend: str, case: KVCase, device: torch.device | str, seed: int) -> None:
    """One KV-cache call of ``backend`` held to the three rules of this module."""
    inputs = make_kv_inputs(case, device, seed)
    before = (inputs.k_cache.clone(), inputs.v_cache.clone())
    given = [t.clone() for t in (inputs.q, inputs.k, inputs.v) if t is not None]
    out, lse = run_kvcache(backend, inputs)
    _check_appended(case, inputs, before)
    for original, now in zip(given, [t for t in (inputs.q, inputs.k, inputs.v) if t is not None]):
        if not torch.equal(_bits(original), _bits(now)):
            raise AssertionError(f"{case.name}: an input tensor was written")
    if out.shape != inputs.q.shape or out.dtype != case.dtype:
        raise AssertionError(f"out: shape {tuple(out.shape)} {out.dtype}, expected {tuple(inputs.q.shape)}")
    oracle_out, oracle_lse = kv_oracle(case, inputs, torch.float64)
    naive_out, naive_lse = kv_oracle(case, inputs, naive_dtype(case.dtype))
    where = f"{backend}/{case.name} (seed {seed})"
    assert_within_rule(f"{where} out", out, oracle_out, naive_out, case.dtype)
    assert_within_rule(f"{where} lse", lse, oracle_lse, naive_lse, case.dtype)


def kv_cpu_cases() -> list[KVCase]:
    """Small odd shapes covering every option of the KV-cache call (fast under Triton's interpreter)."""
    from dataclasses import replace

    base = KVCase("base")
    bf16 = torch.bfloat16
    e4m3 = torch.float8_e4m3fn
    return [
        replace(base, name="decode_fp16"),
        replace(base, name="no_append_bf16", seqlen_new=0, lengths=(7, 1, 40), dtype=bf16),
        replace(base, name="fp32_mha", dtype=torch.float32, heads_q=2, heads_kv=2),
        replace(base, name="fp64", dtype=torch.float64, head_dim=16),
        replace(base, name="splits", num_splits=3, lengths=(33, 2, 17), capacity=48, heads_q=6, heads_kv=2),
        replace(base, name="multi_token_causal", seqlen_q=3, seqlen_new=3, causal=True, lengths=(4, 0, 30)),
        replace(
            base,
            name="window_sinks",
            window=(6, 0),
            causal=True,
            sink_tokens=3,
            lengths=(20, 1, 30),
            seqlen_q=2,
            seqlen_new=2,
            dtype=bf16,
            num_splits=2,
        ),
        replace(
            base,
            name="window_nan_hidden",
            window=(6, 0),
            causal=True,
            seqlen_q=2,
            seqlen_new=2,
            lengths=(20, 1, 30),
            nan_back=(8, 9),
            page_size=11,
        ),
        replace(base, name="window_nan_one_token", window=(5, 0), lengths=(20, 3, 30), nan_back=(7, 8), dtype=bf16),
        replace(base, name="softcap_sink_logits", softcap=3.0, sinks=True, num_splits=2, lengths=(9, 0, 25)),
        replace(base, name="paged_7", page_size=7, lengths=(13, 0, 27), num_splits=2, dtype=bf16),
        replace(
            base,
            name="paged_16_multi",
            page_size=16,
            capacity=64,
            lengths=(31, 16, 47),
            seqlen_q=2,
            seqlen_new=2,
            causal=True,
        ),
        replace(base, name="batch_idx_strided", batch_idx=True, strided=True, heads_q=4, heads_kv=1),
        replace(base, name="rotary_half", rotary="half", seqlen_q=2, seqlen_new=2, causal=True),
        replace(base, name="rotary_interleaved_partial", rotary="interleaved", rotary_dim=16, page_size=5, dtype=bf16),
        replace(base, name="fp8_e4m3_head", dtype=bf16, cache_dtype=e4m3, num_splits=2),
        replace(
            base,
            name="fp8_e4m3_batch_rotary",
            dtype=bf16,
            cache_dtype=e4m3,
            descale="batch",
            rotary="half",
            page_size=8,
        ),
        replace(base, name="fp8_e5m2_tensor", dtype=torch.float16, cache_dtype=torch.float8_e5m2, descale="tensor"),
        replace(base, name="d128_gqa8", head_dim=128, heads_q=8, heads_kv=1, lengths=(3, 20), num_splits=2),
        replace(base, name="nothing_cached", lengths=(0, 0), seqlen_new=0),
    ]


def kv_gpu_cases() -> list[KVCase]:
    """Real sizes (GPU tier): long and empty sequences, GQA 32/8, every cache layout and option."""
    from dataclasses import replace

    bf16 = torch.bfloat16
    base = KVCase(
        "gpu", lengths=(4095, 17, 32760, 0, 1000), capacity=32768, heads_q=32, heads_kv=8, head_dim=128, dtype=bf16
    )
    return [
        replace(base, name="bf16_auto_splits"),
        replace(base, name="bf16_one_split", num_splits=1),
        replace(base, name="fp16_no_append", dtype=torch.float16, seqlen_new=0, lengths=(4096, 1, 32768, 0, 999)),
        replace(base, name="paged_16", page_size=16),
        replace(base, name="paged_64_rotary", page_size=64, rotary="half", seqlen_q=2, seqlen_new=2, causal=True),
        replace(base, name="paged_7_interleaved", page_size=7, rotary="interleaved", rotary_dim=64),
        replace(base, name="paged_256_fp8", page_size=256, cache_dtype=torch.float8_e4m3fn, descale="batch"),
        replace(base, name="fp8_head_descale", cache_dtype=torch.float8_e4m3fn, num_splits=7),
        replace(base, name="window_sink_tokens_sinks", window=(1000, 0), causal=True, sink_tokens=4, sinks=True),
        replace(base, name="speculative_8_tokens", seqlen_q=8, seqlen_new=8, causal=True, softcap=30.0),
        replace(base, name="chunk_of_300", seqlen_q=300, seqlen_new=300, causal=True, lengths=(5000, 0, 700)),
        replace(base, name="batch_idx_mqa_d64", batch_idx=True, heads_kv=1, head_dim=64, lengths=(100, 20000)),
        replace(base, name="d256", head_dim=256, heads_q=8, heads_kv=2, lengths=(3000, 9000), capacity=9100),
        replace(base, name="long_single_sequence", lengths=(131071,), capacity=131072),
        replace(base, name="nan_hidden", window=(512, 0), seqlen_q=4, seqlen_new=4, causal=True, nan_back=(600, 514)),
    ]
