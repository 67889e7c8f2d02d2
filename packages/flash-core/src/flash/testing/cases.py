"""Conformance cases and their random inputs.

A :class:`Case` describes one attention problem (shapes and options); the
catalogues :func:`cpu_cases` (small odd shapes, fast enough for an interpreter)
and :func:`gpu_cases` (real sizes) cover every spec option. :func:`make_inputs`
draws fresh random inputs for a case: never zeros, optionally as
non-contiguous views, in either layout, packed for varlen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flash.spec import default_out_dtype


@dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seqlen_q: int = 37
    seqlen_k: int = 29
    heads_q: int = 4
    heads_kv: int = 4
    head_dim: int = 40
    dtype: torch.dtype = torch.float16
    layout: str = "bshd"
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    scale: float | None = None
    #: The (len_q, len_k) of each sequence of a variable-length batch; overrides batch and seqlen_*.
    seqlens: tuple[tuple[int, int], ...] | None = None
    dropout_p: float = 0.0
    #: q/k/v as non-contiguous views (padded head_dim, heads and sequence axes swapped in memory).
    strided: bool = False
    #: The kind of fp8 descale factors, None, "tensor" or "head".
    descale: str | None = None
    #: ``out_dtype=`` of an fp8 case (None: the default, bf16).
    out_dtype: torch.dtype | None = None
    deterministic: bool = False
    #: Whether to plant a NaN in q (the outputs of that row must be NaN, the others exact).
    nan_in_q: bool = False
    #: Differentiate this case (off for fp8 and NaN cases).
    backward: bool = True
    #: A dense attn_mask: "bool" (B, 1, Sq, Sk), "bias" (1, H, Sq, Sk) float, "padding" (B, 1, 1, Sk) bool
    #: (right padding), "padding_left" (left padding, a sequence may see no key), "padding_holes" (any keys).
    mask: str | None = None
    #: ALiBi slopes per "head" or per "batch_head".
    alibi: str | None = None
    #: A score_mod (flash.testing.mod_examples.SCORE_MODS) or mask_mod (MASK_MODS) by name.
    mod: str | None = None
    #: Build a BlockMask from this MASK_MODS entry (blocks of ``block_size``) and pass it; "documents":
    #: :meth:`flash.BlockMask.from_document_ids` of random documents per sequence, causal.
    block_mask: str | None = None
    block_size: tuple[int, int] = (32, 32)
    #: Learned per-head sink logits (random, float32), differentiated with q, k, v.
    sinks: bool = False
    #: StreamingLLM sink tokens (with a bounded left window).
    sink_tokens: int = 0
    tags: tuple[str, ...] = field(default=())

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`flash.attention` (besides tensors and varlen offsets)."""
        opts: dict[str, Any] = {"layout": self.layout, "causal": self.causal}
        if self.window is not None:
            opts["window"] = self.window
        if self.softcap:
            opts["softcap"] = self.softcap
        if self.scale is not None:
            opts["scale"] = self.scale
        if self.dropout_p:
            opts["dropout_p"] = self.dropout_p
        if self.deterministic:
            opts["deterministic"] = True
        if self.sink_tokens:
            opts["sink_tokens"] = self.sink_tokens
        if self.out_dtype is not None:
            opts["out_dtype"] = self.out_dtype
        return opts


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    options: dict[str, Any]  # everything flash.attention needs besides q, k, v


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device, gen: torch.Generator, strided: bool, layout: str):
    """Random normal tensor of ``shape``; when ``strided``, a non-contiguous view with unit last stride."""
    work = torch.float32 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype
    if not strided:
        return torch.randn(shape, generator=gen, device=device, dtype=work).to(dtype)
    # Memory holds a padded head_dim and the two middle axes swapped; the caller sees `shape`.
    padded = list(shape)
    padded[-1] += 8
    if len(shape) == 4:
        padded[1], padded[2] = padded[2], padded[1]
        base = torch.randn(padded, generator=gen, device=device, dtype=work).to(dtype)
        return base.transpose(1, 2)[..., : shape[-1]]
    base = torch.randn(padded, generator=gen, device=device, dtype=work).to(dtype)
    return base[..., : shape[-1]]


def make_inputs(case: Case, device: torch.device | str, seed: int, requires_grad: bool = False) -> Inputs:
    """Fresh random inputs for ``case`` from ``seed``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    options = case.options()
    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    hq, hkv, d = case.heads_q, case.heads_kv, case.head_dim
    if case.seqlens is not None:
        lens_q = [a for a, _ in case.seqlens]
        lens_k = [b for _, b in case.seqlens]
        total_q, total_k = sum(lens_q), sum(lens_k)
        offsets = [torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32) for lens in (lens_q, lens_k)]
        options.update(
            cu_seqlens_q=offsets[0], cu_seqlens_k=offsets[1], max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k)
        )
        q_shape, kv_shape = (total_q, hq, d), (total_k, hkv, d)
        if case.layout == "bhsd":
            q_shape, kv_shape = (hq, total_q, d), (hkv, total_k, d)
    else:
        b, sq, sk = case.batch, case.seqlen_q, case.seqlen_k
        q_shape, kv_shape = (b, sq, hq, d), (b, sk, hkv, d)
        if case.layout == "bhsd":
            q_shape, kv_shape = (b, hq, sq, d), (b, hkv, sk, d)
    q = _randn(q_shape, case.dtype, device, gen, case.strided, case.layout)
    k = _randn(kv_shape, case.dtype, device, gen, case.strided, case.layout)
    v = _randn(kv_shape, case.dtype, device, gen, case.strided, case.layout)
    if case.nan_in_q and q.numel():
        q[tuple(s // 2 for s in q.shape)] = float("nan")
    if case.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and case.descale:
        batch = len(case.seqlens) if case.seqlens is not None else case.batch

        def factor(heads: int) -> torch.Tensor:
            shape = () if case.descale == "tensor" else (batch, heads)
            return torch.rand(shape, generator=gen, device=device) + 0.5

        options.update(q_descale=factor(hq), k_descale=factor(hkv), v_descale=factor(hkv))
    if case.dropout_p:
        options["dropout_seed"] = seed
    options.update(_mask_options(case, q.shape if case.layout == "bshd" else q.transpose(1, 2).shape, device, gen))
    if case.sinks:
        options["sinks"] = torch.randn(hq, generator=gen, device=device, dtype=torch.float32)
    out_dtype = case.out_dtype or default_out_dtype(case.dtype)
    dout = torch.randn(q.shape, generator=gen, device=device, dtype=torch.float32).to(out_dtype)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        if case.sinks:
            options["sinks"].requires_grad_()
    return Inputs(q, k, v, dout, options)


def _mask_options(case: Case, shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """The mask and score options of ``case`` for canonical q ``shape`` (batch, seqlen_q, heads, dim)."""
    from flash.block_mask import BlockMask
    from flash.testing.mod_examples import MASK_MODS, SCORE_MODS

    out: dict[str, Any] = {}
    b, sq, h = shape[0], shape[1], shape[2]
    sk = case.seqlen_k
    if case.mask == "bool":
        mask = torch.rand((b, 1, sq, sk), generator=gen, device=device) > 0.3
        mask[..., 0] = True  # every row sees a key, except where the test wants otherwise
        out["attn_mask"] = mask
    elif case.mask == "bias":
        out["attn_mask"] = torch.randn((1, h, sq, sk), generator=gen, device=device)
    elif case.mask == "padding":
        lengths = torch.randint(1, sk + 1, (b,), generator=gen, device=device)
        out["attn_mask"] = (torch.arange(sk, device=device) < lengths[:, None])[:, None, None, :]
    elif case.mask == "padding_left":
        lengths = torch.randint(0, sk + 1, (b,), generator=gen, device=device)
        out["attn_mask"] = (torch.arange(sk, device=device) >= sk - lengths[:, None])[:, None, None, :]
    elif case.mask == "padding_holes":
        out["attn_mask"] = (torch.rand((b, 1, 1, sk), generator=gen, device=device) > 0.4) | (
            torch.arange(sk, device=device) == 0
        )
    if case.alibi == "head":
        out["alibi_slopes"] = torch.rand((h,), generator=gen, device=device)
    elif case.alibi == "batch_head":
        out["alibi_slopes"] = torch.rand((b, h), generator=gen, device=device)
    if case.mod in SCORE_MODS:
        out["score_mod"], out["score_mod_grad"] = SCORE_MODS[case.mod]
    elif case.mod is not None:
        out["mask_mod"] = MASK_MODS[case.mod]
    if case.block_mask == "documents":
        starts = torch.rand((b, sk), generator=gen, device=device) < 0.15  # a new document at ~15% of tokens
        out["block_mask"] = BlockMask.from_document_ids(starts.cumsum(dim=1), block_size=case.block_size)
    elif case.block_mask is not None:
        out["block_mask"] = BlockMask.from_mask_mod(
            MASK_MODS[case.block_mask], batch=None, heads=None, seqlen_q=sq, seqlen_k=sk, block_size=case.block_size,
            device=device,
        )  # fmt: skip
    return out


def cpu_cases() -> list[Case]:
    """Small odd shapes covering every spec option (CPU tier; fast under Triton's interpreter)."""
    base = Case("base")
    _f16, bf16 = torch.float16, torch.bfloat16
    cases = [
        replace(base, name="fp16"),
        replace(base, name="bf16", dtype=bf16, head_dim=64),
        replace(base, name="fp32", dtype=torch.float32),
        replace(base, name="fp64", dtype=torch.float64, head_dim=16),
        replace(base, name="causal_square", seqlen_q=33, seqlen_k=33, causal=True),
        replace(base, name="causal_more_queries", causal=True, dtype=bf16),  # 37 > 29: rows that see no key
        replace(base, name="causal_more_keys", seqlen_q=19, seqlen_k=45, causal=True),
        replace(base, name="window", window=(7, 3), dtype=bf16),
        replace(base, name="window_diagonal", window=(0, 0), seqlen_q=21, seqlen_k=21),
        replace(base, name="window_left_causal", window=(5, 0), causal=True, seqlen_q=40, seqlen_k=52),
        replace(base, name="window_right_only", window=(-1, 2), seqlen_q=45, seqlen_k=24),
        replace(base, name="softcap", softcap=5.0, dtype=bf16),
        replace(base, name="softcap_causal", softcap=2.0, causal=True, seqlen_q=30, seqlen_k=30),
        replace(base, name="gqa", heads_q=6, heads_kv=2),
        replace(base, name="mqa_causal", heads_q=4, heads_kv=1, causal=True, dtype=bf16),
        replace(base, name="varlen", seqlens=((5, 9), (0, 3), (17, 1), (1, 0), (33, 30)), heads_q=4, heads_kv=2),
        replace(base, name="varlen_causal", seqlens=((12, 20), (31, 7), (1, 1)), causal=True, dtype=bf16),
        replace(base, name="bhsd", layout="bhsd", heads_q=4, heads_kv=2),
        replace(base, name="bhsd_varlen", layout="bhsd", seqlens=((6, 11), (19, 4))),
        replace(base, name="strided", strided=True, heads_q=4, heads_kv=2, causal=True),
        replace(base, name="strided_bhsd", strided=True, layout="bhsd"),
        replace(base, name="d16", head_dim=16, seqlen_q=17, seqlen_k=23),
        replace(base, name="d96", head_dim=96, seqlen_q=20, seqlen_k=18, dtype=bf16),
        replace(base, name="d128", head_dim=128, seqlen_q=18, seqlen_k=19, causal=True),
        replace(base, name="d160", head_dim=160, seqlen_q=9, seqlen_k=14, heads_q=2, heads_kv=1),
        replace(base, name="d256", head_dim=256, seqlen_q=9, seqlen_k=11, heads_q=2, heads_kv=2, dtype=bf16),
        replace(base, name="seqlen1", seqlen_q=1, seqlen_k=1),
        replace(base, name="one_query_many_keys", seqlen_q=1, seqlen_k=70, causal=True),
        replace(base, name="scale", scale=0.3),
        replace(base, name="dropout", dropout_p=0.2, heads_q=4, heads_kv=2),
        replace(base, name="dropout_causal_varlen", dropout_p=0.1, causal=True, seqlens=((9, 13), (20, 20))),
        replace(base, name="deterministic", deterministic=True, heads_q=6, heads_kv=2, causal=True),
        replace(base, name="sinks_gqa_causal", sinks=True, heads_q=6, heads_kv=2, causal=True, dtype=bf16),
        replace(
            base,
            name="sink_tokens_window_varlen",
            seqlens=((70, 90), (9, 9)),
            window=(4, 0),
            causal=True,
            sink_tokens=3,
            sinks=True,
        ),
        replace(base, name="nan", nan_in_q=True, backward=False),
        replace(base, name="empty_queries", seqlen_q=0),
        replace(base, name="empty_keys", seqlen_k=0),
        replace(base, name="fp8_e4m3_tensor", dtype=torch.float8_e4m3fn, descale="tensor", backward=False),
        replace(
            base,
            name="fp8_e5m2_head",
            dtype=torch.float8_e5m2,
            descale="head",
            heads_q=4,
            heads_kv=2,
            backward=False,
            causal=True,
        ),
        replace(
            base,
            name="fp8_varlen_head",
            dtype=torch.float8_e4m3fn,
            descale="head",
            seqlens=((7, 9), (12, 3)),
            backward=False,
        ),
        replace(
            base,
            name="fp8_fp16_out_head",
            dtype=torch.float8_e4m3fn,
            descale="head",
            out_dtype=torch.float16,
            heads_q=4,
            heads_kv=2,
            causal=True,
            backward=False,
        ),
    ]
    return cases + mask_cases()


def mask_cases() -> list[Case]:
    """attn_mask, ALiBi, block masks and mods (CPU tier: small, so the interpreter stays quick)."""
    base = Case("masks", batch=2, seqlen_q=40, seqlen_k=40, heads_q=2, heads_kv=2, head_dim=32)
    bf16 = torch.bfloat16
    return [
        replace(base, name="mask_bool", mask="bool", heads_kv=1),
        replace(base, name="mask_bias_window", mask="bias", window=(9, 4), dtype=bf16),
        replace(base, name="mask_padding_causal", mask="padding", causal=True, seqlen_q=37),
        replace(base, name="mask_padding_left_window", mask="padding_left", window=(9, 4), heads_kv=1, seqlen_k=71),
        replace(base, name="mask_padding_holes", mask="padding_holes", seqlen_q=23, seqlen_k=53, dtype=bf16),
        replace(base, name="alibi_causal", alibi="batch_head", causal=True, seqlen_k=45),
        replace(base, name="alibi_softcap", alibi="head", softcap=3.0, dtype=bf16),
        replace(base, name="score_mod_softcap", mod="softcap", dtype=bf16),
        replace(base, name="score_mod_relative_gqa", mod="relative_bias", heads_q=4, heads_kv=2, batch=1),
        replace(base, name="mask_mod_prefix_lm", mod="prefix_lm"),
        replace(base, name="block_mask_local_global", block_mask="local_global", seqlen_q=70, seqlen_k=70, batch=1),
        replace(base, name="block_mask_documents", block_mask="documents", seqlen_q=77, seqlen_k=77, dtype=bf16),
        replace(base, name="block_sparse", block_mask="block_pattern", seqlen_q=300, seqlen_k=290, batch=1, dtype=bf16),
    ]


def gpu_cases() -> list[Case]:
    """Real sizes (GPU tier): long and tiny sequences, wildly different varlen lengths."""
    base = Case("gpu", batch=2, heads_q=8, heads_kv=8, head_dim=128, dtype=torch.bfloat16)
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        tag = "fp16" if dtype == torch.float16 else "bf16"
        for seqlen in (1, 17, 1000):
            for causal in (False, True):
                cases.append(
                    replace(
                        base,
                        name=f"{tag}_s{seqlen}_{'causal' if causal else 'full'}",
                        dtype=dtype,
                        seqlen_q=seqlen,
                        seqlen_k=seqlen,
                        causal=causal,
                    )
                )
    cases += [
        replace(
            base, name="bf16_s8192_causal", batch=1, heads_q=2, heads_kv=2, seqlen_q=8192, seqlen_k=8192, causal=True
        ),
        replace(
            base, name="bf16_s8192_full_d64", batch=1, heads_q=2, heads_kv=2, head_dim=64, seqlen_q=8192, seqlen_k=8192
        ),
        replace(base, name="fp16_q1000_k3001_causal", seqlen_q=1000, seqlen_k=3001, causal=True, dtype=torch.float16),
        replace(base, name="bf16_q3001_k1000_causal", seqlen_q=3001, seqlen_k=1000, causal=True),
        replace(base, name="bf16_gqa_8_2", heads_q=8, heads_kv=2, seqlen_q=1531, seqlen_k=1531, causal=True),
        replace(base, name="bf16_mqa_d64", heads_q=8, heads_kv=1, head_dim=64, seqlen_q=777, seqlen_k=2049),
        replace(
            base,
            name="bf16_varlen_wild",
            heads_q=8,
            heads_kv=4,
            seqlens=((1, 1), (1000, 3000), (4097, 17), (0, 5), (2000, 2000), (3, 4096), (513, 0)),
        ),
        replace(
            base,
            name="fp16_varlen_wild_causal",
            dtype=torch.float16,
            causal=True,
            seqlens=((4096, 4096), (1, 4000), (1777, 1777), (5, 5), (3000, 1200)),
        ),
        replace(base, name="bf16_window", seqlen_q=2048, seqlen_k=2048, window=(256, 0)),
        replace(base, name="bf16_softcap", seqlen_q=1024, seqlen_k=1024, softcap=30.0, causal=True),
        replace(base, name="bf16_bhsd_strided", layout="bhsd", strided=True, seqlen_q=1000, seqlen_k=1000),
        replace(base, name="bf16_d64", head_dim=64, seqlen_q=2000, seqlen_k=2000, causal=True),
        replace(base, name="bf16_d96", head_dim=96, seqlen_q=1000, seqlen_k=1000),
        replace(base, name="fp16_d256", head_dim=256, seqlen_q=1000, seqlen_k=1000, causal=True, dtype=torch.float16),
        replace(base, name="bf16_d40", head_dim=40, seqlen_q=999, seqlen_k=1001),
        replace(
            base,
            name="bf16_deterministic",
            deterministic=True,
            heads_q=8,
            heads_kv=2,
            seqlen_q=1000,
            seqlen_k=1000,
            causal=True,
        ),
        replace(base, name="bf16_dropout", dropout_p=0.1, seqlen_q=512, seqlen_k=512),
        replace(base, name="bf16_mask_bool", mask="bool", seqlen_q=1000, seqlen_k=1000),
        replace(base, name="bf16_mask_padding", mask="padding", seqlen_q=2048, seqlen_k=2048),
        replace(base, name="bf16_mask_bias_causal", mask="bias", causal=True, seqlen_q=777, seqlen_k=1000),
        replace(base, name="bf16_alibi_causal", alibi="batch_head", causal=True, seqlen_q=1500, seqlen_k=1500),
        replace(base, name="bf16_score_mod_softcap", mod="softcap", seqlen_q=1000, seqlen_k=1000),
        replace(base, name="bf16_mask_mod_prefix_lm", mod="prefix_lm", seqlen_q=1000, seqlen_k=1000),
        replace(
            base,
            name="bf16_block_mask_local_global",
            block_mask="local_global",
            block_size=(128, 128),
            seqlen_q=2048,
            seqlen_k=2048,
        ),
        replace(  # full blocks only, tail blocks on both axes, GQA: the cuda Hopper forward's block lists
            base,
            name="bf16_block_sparse_gqa",
            block_mask="block_pattern",
            block_size=(128, 128),
            heads_kv=2,
            seqlen_q=1000,
            seqlen_k=1100,
        ),
        replace(
            base,
            name="bf16_window_sink_tokens_sinks",
            heads_q=8,
            heads_kv=2,
            seqlen_q=2048,
            seqlen_k=2500,
            window=(256, 0),
            causal=True,
            sink_tokens=4,
            sinks=True,
        ),
    ]
    return cases
