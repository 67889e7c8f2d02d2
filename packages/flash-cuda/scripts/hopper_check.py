"""GPU harness of the Hopper forward kernel (flash_cuda.hopper): compile, check, time, sanitize.

Run from the repository root on an sm_90 machine, without installing anything:

    PYTHONPATH=packages/flash-cuda/src python3 packages/flash-cuda/scripts/hopper_check.py

Phases, each in its own subprocess with a time limit (a hung kernel costs one phase, not the run):

1. compile  -- every shipped variant and every timing candidate, in parallel (fills CuPy's disk cache);
2. check    -- each case against a float64 dense oracle with the tolerance rule (max error <= 2 x the
               naive same-precision error + eps), outputs poisoned with NaN, guard bands around out and
               LSE, fresh random inputs, a repeat run that must be bitwise identical;
3. bench    -- TFLOP/s against torch SDPA's cuDNN and flash (FA2) backends in the same process
               (batch * seqlen = 16k tokens, heads * head_dim = 2048, bf16, do_bench medians); tile A/B:
               HOPPER_BENCH="d128 s8192 full: 2x192, 2x160; d128 s1024 causal: 3x128 auto q2" times
               only those cases, at the table's tiles and at each candidate; the candidate "prepass"
               also times the fp8 forward's V^T pre-pass alone (the fp8 call includes it) and checks
               its output against a torch reference;
4. sanitize -- compute-sanitizer memcheck, racecheck and synccheck on one small case.

Logs go to $OUT (or ./hopper_out); the short tables come last on stdout. Imports no flash-core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "hopper_out")
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.normpath(os.path.join(HERE, "..", "src"))
if SRC not in sys.path:
    sys.path.insert(0, SRC)


def log(*parts: object) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    d: int = 128
    b: int = 2
    sq: int = 256
    sk: int | None = None
    hq: int = 2
    hkv: int | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    dtype: str = "bf16"  # bf16, fp16, e4m3 or e5m2 (fp8: bshd, per-(batch, head) descales, bf16 out)
    out_dtype: str = "bf16"  # fp8 only
    flip_q: bool = False  # fp8: q and its descale negated (the same values)
    varlen: list[int] | None = None  # query lengths (keys: varlen_k or the same)
    varlen_k: list[int] | None = None
    layout: str = "bshd"  # bshd, bhsd (heads outer), padded (rows wider than head_dim)
    scale: float | None = None
    config: tuple | None = None  # (consumers, block_n[, order]) instead of the table's

    @property
    def seqlen_k(self) -> int:
        """The longest key sequence (what the table's seqlen buckets look at)."""
        if self.varlen:
            return max(self.varlen_k or self.varlen)
        return self.sk or self.sq

    @property
    def fp8(self) -> bool:
        return self.dtype in ("e4m3", "e5m2")

    def hopper_config(self):
        from flash_cuda import hopper_tiles

        if self.config:
            return hopper_tiles.HopperConfig(*self.config)
        return hopper_tiles.config_for(self.d, self.window, self.seqlen_k, self.fp8)

    def variant(self):
        from flash_cuda import hopper_tiles, hopper_variants

        out = self.out_dtype if self.fp8 else ""
        mask = hopper_tiles.mask_kind(self.window)
        return hopper_variants.make_variant(self.hopper_config(), self.d, self.dtype, mask, out)


def check_cases() -> list[Case]:
    c: list[Case] = []
    # the simplest case first: if it fails, the rest says little
    c.append(Case("basic d128", d=128, b=1, sq=128, hq=1))
    for d in (64, 96, 128, 192, 256):
        c.append(Case(f"full d{d}", d=d, b=2, sq=300, sk=517, hq=3))
        c.append(Case(f"causal d{d}", d=d, b=2, sq=333, hq=2, window=(-1, 0)))
        c.append(Case(f"fp16 causal d{d}", d=d, b=1, sq=257, sk=400, hq=2, window=(-1, 0), dtype="fp16"))
    c += [
        Case("fp16 full d128", dtype="fp16", sq=200, sk=700),
        Case("causal sq>sk (rows without keys)", sq=300, sk=100, window=(-1, 0)),
        Case("causal sq<sk", sq=100, sk=555, window=(-1, 0)),
        Case("window (40, 7)", sq=400, sk=450, window=(40, 7)),
        Case("window (0, 0)", d=64, sq=300, window=(0, 0)),
        Case("window left only (100, -1)", sq=500, window=(100, -1)),
        Case("window right 50 (-1, 50)", sq=300, window=(-1, 50)),
        Case("window d256 (64, 64)", d=256, sq=400, window=(64, 64)),
        Case("window d64 sq>sk", d=64, sq=500, sk=200, window=(30, 10)),
        Case("softcap full", sq=300, softcap=30.0),
        Case("softcap causal d64 fp16", d=64, sq=333, window=(-1, 0), softcap=5.0, dtype="fp16"),
        Case("gqa 8/2", hq=8, hkv=2, sq=200, sk=300),
        Case("mqa 6/1 causal d64", d=64, hq=6, hkv=1, sq=257, window=(-1, 0)),
        Case("head dim 40 -> 64", d=40, sq=150),
        Case("head dim 80 -> 96", d=80, sq=150, window=(-1, 0)),
        Case("head dim 8 -> 64", d=8, sq=100),
        Case("head dim 160 -> 192", d=160, sq=150),
        Case("head dim 232 -> 256", d=232, sq=150, window=(-1, 0)),
        Case("seqlen 1", sq=1, sk=1),
        Case("sq 1, sk 1000", sq=1, sk=1000),
        Case("sq 1000, sk 1 causal", sq=1000, sk=1, window=(-1, 0)),
        Case("layout bhsd", layout="bhsd", sq=250, hq=3, window=(-1, 0)),
        Case("layout padded rows", layout="padded", sq=250, d=64),
        Case("layout bhsd d96 gqa", layout="bhsd", d=96, hq=4, hkv=2, sq=190),
        Case("varlen", varlen=[1, 17, 300, 0, 129, 64], hq=2),
        Case("varlen causal gqa", varlen=[200, 1, 77, 513], varlen_k=[250, 5, 77, 300], hq=4, hkv=2, window=(-1, 0)),
        Case("varlen window d64", d=64, varlen=[130, 260, 7], window=(16, 16)),
        Case("varlen d256 softcap", d=256, varlen=[100, 333], softcap=20.0),
        Case("many tiles full (persistent rounds)", d=64, b=3, sq=1100, hq=16),
        Case("many tiles causal", d=128, b=2, sq=2048, hq=16, window=(-1, 0)),
        Case("many tiles causal d256", d=256, b=1, sq=1500, hq=12, window=(-1, 0)),
        Case("large scale", sq=300, scale=1.0),
        Case("full, blocks order", d=64, b=2, sq=700, hq=5, config=(3, 128, "blocks")),
        Case("varlen causal, heads order", varlen=[300, 40, 700], window=(-1, 0), config=(2, 128, "heads")),
        Case("d128 full 128x176", sq=800, sk=900, hq=3, config=(2, 176)),
        Case("d96 full 128x176", d=96, sq=500, hq=3, config=(2, 176)),
        Case("two Q buffers, many tiles", d=128, b=3, sq=1000, hq=8, config=(2, 128, "heads", 2)),
        Case(
            "two Q buffers, varlen causal",
            varlen=[500, 3, 129, 1000, 64],
            hq=3,
            window=(-1, 0),
            config=(2, 128, "blocks", 2),
        ),
        Case("two Q buffers, c3 causal d64", d=64, b=2, sq=900, hq=6, window=(-1, 0), config=(3, 128, "heads", 2)),
        Case(
            "d64 causal 128x128 two Q buffers varlen",
            d=64,
            varlen=[900, 5, 300],
            window=(-1, 0),
            config=(2, 128, "auto", 2),
        ),
        Case("fp16 window d128 many tiles", dtype="fp16", b=2, sq=1500, hq=8, window=(200, 30)),
        *fp8_cases(),
        Case("tiles without keys between tiles", b=2, sq=2000, sk=300, hq=8, window=(50, 0)),
        Case(
            "tiles without keys, two Q buffers",
            d=64,
            b=2,
            sq=2000,
            sk=300,
            hq=8,
            window=(50, 0),
            config=(3, 128, "heads", 2),
        ),
    ]
    return c


def fp8_cases() -> list[Case]:
    c = [Case("fp8 basic d128", d=128, b=1, sq=128, hq=1, dtype="e4m3")]
    for d in (64, 128, 192, 256):
        c.append(Case(f"fp8 full d{d}", d=d, b=2, sq=300, sk=517, hq=3, dtype="e4m3"))
        c.append(Case(f"fp8 causal d{d}", d=d, b=2, sq=333, hq=2, window=(-1, 0), dtype="e4m3"))
    return [
        *c,
        Case("fp8 e5m2 full d128", sq=200, sk=700, dtype="e5m2"),
        Case("fp8 fp16 out causal", sq=300, window=(-1, 0), dtype="e4m3", out_dtype="fp16"),
        Case("fp8 negative q descale", sq=200, sk=333, dtype="e4m3", flip_q=True),
        Case("fp8 window d64 gqa", d=64, hq=6, hkv=2, sq=400, window=(50, 10), dtype="e4m3"),
        Case("fp8 softcap d128", sq=300, softcap=20.0, dtype="e4m3"),
        Case("fp8 head dim 80 -> 128", d=80, sq=150, window=(-1, 0), dtype="e4m3"),
        Case(
            "fp8 varlen causal gqa",
            varlen=[200, 1, 77, 513],
            varlen_k=[250, 5, 77, 300],
            hq=4,
            hkv=2,
            window=(-1, 0),
            dtype="e4m3",
        ),
        Case("fp8 many tiles causal", d=128, b=2, sq=2048, hq=16, window=(-1, 0), dtype="e4m3"),
        Case("fp8 many tiles full d256", d=256, b=1, sq=1500, hq=12, dtype="e4m3"),
        # the pre-pass's V^T: sequences starting off a 32-key step, an empty one, one key, gaps
        Case("fp8 varlen d64 window", d=64, varlen=[130, 0, 1, 260, 33], window=(16, 16), dtype="e4m3"),
        Case("fp8 varlen d256 full e5m2", d=256, varlen=[100, 333, 31], varlen_k=[77, 500, 1], dtype="e5m2"),
        Case("fp8 varlen d192 causal", d=192, varlen=[65, 190, 7], hq=4, hkv=1, window=(-1, 0), dtype="e4m3"),
        Case("fp8 sk 1", sq=100, sk=1, dtype="e4m3"),
        Case("fp8 layout bhsd gqa", layout="bhsd", hq=4, hkv=2, sq=190, sk=250, dtype="e4m3"),
    ]


@dataclass
class BenchCase:
    d: int
    seqlen: int
    causal: bool
    configs: list[tuple | None] = field(default_factory=lambda: [None])  # None: the table's
    time_prepass: bool = False  # fp8: also the V^T pre-pass alone


def bench_cases(selection: str | None = None) -> list[BenchCase]:
    """Every benchmark case at the table's tiles, or the cases of ``selection``: ';'-separated
    "d128 s8192 full: 2x192, 3x128 heads q2, prepass" (case, then candidate tiles: consumers x block_n,
    an optional order and Q stages; "prepass": the fp8 V^T pre-pass alone too), each timed at the
    table's tiles and at its candidates."""
    if selection:
        return [_parse_bench_case(part) for part in selection.split(";") if part.strip()]
    cases = [BenchCase(d, s, c) for d in (128, 64, 256) for s in (8192, 4096, 1024) for c in (False, True)]
    return cases + [BenchCase(d, 8192, c) for d in (96, 192) for c in (False, True)]


def _parse_bench_case(text: str) -> BenchCase:
    name, _, tiles = text.partition(":")
    d, s, mask = name.split()
    configs: list[tuple | None] = [None]
    time_prepass = False
    for tile in filter(None, (t.strip() for t in tiles.split(","))):
        if tile == "prepass":
            time_prepass = True
            continue
        shape, *rest = tile.split()
        consumers, block_n = (int(x) for x in shape.split("x"))
        order = next((word for word in rest if word in ("heads", "blocks", "auto")), "heads")
        q_stages = next((int(word[1:]) for word in rest if word.startswith("q")), 1)
        configs.append((consumers, block_n, order, q_stages))
    return BenchCase(int(d.lstrip("d")), int(s.lstrip("s")), mask == "causal", configs, time_prepass)


# ------------------------------------------------------------------ reference


def dense_reference(q, k, v, case: Case, cu_q, cu_k, scale: float, compute, p_dtype=None):
    """Dense attention of canonical (b, s, h, d) views in dtype `compute`: (out, lse); `p_dtype`:
    the probabilities rounded to it before P V (fp8's naive computation)."""
    import torch

    hq = q.shape[2]
    group = hq // k.shape[2]
    left, right = case.window
    if cu_q is None:
        bounds = [(bi, 0, q.shape[1], 0, k.shape[1]) for bi in range(q.shape[0])]
    else:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        bounds = [(0, cq[i], cq[i + 1] - cq[i], ck[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
    outs, lses = [], []
    for bi, q0, lq, k0, lk in bounds:
        qs = q[bi, q0 : q0 + lq].to(compute)
        ks = k[bi, k0 : k0 + lk].to(compute).repeat_interleave(group, dim=1)
        vs = v[bi, k0 : k0 + lk].to(compute).repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if case.softcap:
            s = case.softcap * torch.tanh(s / case.softcap)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        delta = j - i - (lk - lq)
        seen = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if right >= 0:
            seen &= delta <= right
        if left >= 0:
            seen &= delta >= -left
        s = s.masked_fill(~seen, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True) if lk else s.new_zeros((*s.shape[:-1], 1))
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        lses.append((torch.log(denom) + row_max).squeeze(-1))  # (h, lq)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        if p_dtype is not None:
            p = p.to(p_dtype).to(compute)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
    if cu_q is None:
        return torch.stack(outs), torch.stack(lses)
    return torch.cat(outs)[None], torch.cat(lses, dim=1)[None]


def max_error(actual, expected) -> float:
    import torch

    a, e = actual.double(), expected.double()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return math.inf
    special = torch.isinf(e)
    if not torch.equal(a[special], e[special]) or torch.isinf(a[~special]).any():
        return math.inf
    finite = ~special & ~torch.isnan(e)
    return (a[finite] - e[finite]).abs().max().item() if finite.any() else 0.0


EPS = {"bf16": 1e-4, "fp16": 1e-5, "e4m3": 1e-4, "e5m2": 1e-4}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


# ------------------------------------------------------------------ tensors with guard bands

SENTINEL = 1024.0  # exact in fp16, bf16 and fp32: guard bands must keep it


def guarded(shape, strides, numel, dtype, device):
    """A view of `shape`/`strides` inside a larger buffer filled with SENTINEL; the view holds NaN."""
    import torch

    buf = torch.full((numel + 64,), SENTINEL, dtype=dtype, device=device)
    view = buf.as_strided(shape, strides, 32)
    view.fill_(float("nan"))
    index = torch.arange(buf.numel(), device=device).as_strided(shape, strides, 32)
    guard = torch.ones(buf.numel(), dtype=torch.bool, device=device)
    guard[index.reshape(-1)] = False
    return buf, view, guard


def make_problem(case: Case, seed: int, device="cuda"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.dtype, torch.float32)  # fp8: quantised below
    hkv = case.hkv or case.hq
    d = case.d
    if case.varlen:
        lens_q = case.varlen
        lens_k = case.varlen_k or lens_q
        b, sq, sk = 1, sum(lens_q), sum(lens_k)
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
        max_q, max_k = max(lens_q), max(lens_k)
    else:
        b, sq, sk = case.b, case.sq, case.sk or case.sq
        cu_q = cu_k = None
        max_q, max_k = sq, sk

    def tensor(s, h):
        if case.layout == "bhsd":
            t = torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.float32).to(dtype)
            return t.transpose(1, 2)
        if case.layout == "padded":
            t = torch.randn(b, s, h, d + 8, generator=g, device=device, dtype=torch.float32).to(dtype)
            return t[..., :d]
        return torch.randn(b, s, h, d, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = tensor(sq, case.hq), tensor(sk, hkv), tensor(sk, hkv)
    descales = (None, None, None)
    if case.fp8:
        (q, qd), (k, kd), (v, vd) = (quantize(t, case.dtype, per_head=not case.varlen) for t in (q, k, v))
        if case.flip_q:
            q, qd = (-q.float()).to(q.dtype), -qd
        descales = (qd, kd, vd)
        dtype = torch.bfloat16 if case.out_dtype == "bf16" else torch.float16
    # out: (b, s, h, d) view with padding everywhere (rows d+8 wide, one spare head, spare rows)
    hp, dp = case.hq + 1, d + 8
    if case.layout == "bhsd":
        o_strides = ((sq + 3) * hp * dp, dp, (sq + 3) * dp, 1)
    else:
        o_strides = ((sq + 3) * hp * dp, hp * dp, dp, 1)
    o_buf, out, o_guard = guarded((b, sq, case.hq, d), o_strides, b * (sq + 3) * hp * dp, dtype, device)
    l_strides = (hp * (sq + 5), sq + 5, 1)
    l_buf, lse, l_guard = guarded((b, case.hq, sq), l_strides, b * hp * (sq + 5), torch.float32, device)
    return dict(
        q=q, k=k, v=v, out=out, lse=lse, o_buf=o_buf, o_guard=o_guard, l_buf=l_buf, l_guard=l_guard,
        cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, hkv=hkv, descales=descales,
    )  # fmt: skip


def quantize(t, fp8: str, per_head: bool):
    """(t in fp8, float32 descale): one factor per (batch, head), or one for the tensor."""
    import torch

    dims = (1, 3) if per_head else (0, 1, 2, 3)
    # float32 whatever t is: hopper.forward reads the factors as float32 (the bench's bf16 inputs once
    # gave bf16 factors, read as garbage: its "max |out - cuDNN|" said 2e3 while the kernel was right)
    amax = t.float().abs().amax(dim=dims, keepdim=True).clamp_min(1e-30)
    descale = amax / FP8_MAX[fp8]
    t8 = (t.float() / descale).to(torch.float8_e4m3fn if fp8 == "e4m3" else torch.float8_e5m2)
    return t8, (descale[:, 0, :, 0].contiguous() if per_head else descale.reshape(()))


def dequantized(t8, descale):
    return t8.float() * (descale[:, None, :, None] if descale.dim() == 2 else descale)


def run_case(case: Case, prob: dict) -> None:
    from flash_cuda import hopper, hopper_tiles

    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.d)
    config = hopper_tiles.HopperConfig(*case.config) if case.config else None
    hopper.forward(
        prob["q"], prob["k"], prob["v"], prob["out"], prob["lse"], cu_seqlens_q=prob["cu_q"],
        cu_seqlens_k=prob["cu_k"], seqlen_q=prob["max_q"], seqlen_k=prob["max_k"], heads_q=case.hq,
        heads_kv=prob["hkv"], head_dim=case.d, window=case.window, softcap=case.softcap, scale=scale, config=config,
        q_descale=prob["descales"][0], k_descale=prob["descales"][1], v_descale=prob["descales"][2],
    )  # fmt: skip


def poison_vt_allocation(case: Case, prob: dict) -> None:
    """fp8: leave a freed block of NaN bytes (0xff in e4m3 and e5m2) of V^T's size in torch's caching
    allocator, which the pre-pass's V^T then gets: a column it did not write would poison O."""
    import torch

    from flash_cuda import hopper

    v = prob["v"]
    varlen = prob["cu_q"] is not None
    sequences = prob["cu_q"].numel() - 1 if varlen else v.shape[0]
    columns = hopper.vt_columns(prob["max_k"], v.shape[1], sequences, varlen)
    nbytes = (1 if varlen else sequences) * prob["hkv"] * case.d * columns
    torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=v.device)  # freed at once, kept by the allocator


def diagnose(what, got, exact, limit) -> str:
    """Where the errors are: which (batch, row, head) entries, and a column / row-mod-8 profile."""
    import torch

    err = (got.double() - exact.double()).abs().nan_to_num(float("inf"))
    err[torch.isinf(exact) & (got.double() == exact.double())] = 0
    bad = err > limit
    if not bad.any():
        return f"{what}: ok"
    idx = bad.nonzero()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} bad (limit {limit:.2e}), first:"]
    for row in idx[:6].tolist():
        lines.append(f"   at {tuple(row)} got {got[tuple(row)].item():.5g} want {exact[tuple(row)].item():.5g}")
    if got.dim() == 4:
        cols = bad.flatten(0, 2).float().mean(0)
        chunks = cols.view(-1, 8).mean(1).tolist()
        lines.append("   bad fraction per 8-column chunk: " + " ".join(f"{x:.2f}" for x in chunks))
        rows = bad.any(-1).any(-1).float().mean(0)[:64].tolist()  # per sequence row, first 64
        lines.append(
            "   bad rows (first 64; x all, o some): " + "".join("x" if x > 0.5 else "o" if x else "." for x in rows)
        )
    return "\n".join(lines)


def oracle(case: Case, prob: dict, scale: float):
    """(out, lse) of the float64 oracle and the limits of the tolerance rule on them: 2 x the naive
    same-precision error + eps. fp8: the oracle of the dequantised values; naive: bf16 with P rounded
    to e4m3, as the conformance suite defines it (fp32 would be stricter than the fp8 tensor cores' own
    accumulation, whose scores carry ~1e-4 relative error: the first run's LSEs were 1.5-7e-4 off,
    outputs well inside)."""
    import torch

    if case.fp8:
        qkv = [dequantized(t, d) for t, d in zip((prob["q"], prob["k"], prob["v"]), prob["descales"])]
        args = (*qkv, case, prob["cu_q"], prob["cu_k"], scale)
        ex_o, ex_l = dense_reference(*args, torch.float64)
        nv_o, nv_l = dense_reference(*args, torch.bfloat16, p_dtype=torch.float8_e4m3fn)
        nv_o = nv_o.to(prob["out"].dtype)
    else:
        args = (prob["q"], prob["k"], prob["v"], case, prob["cu_q"], prob["cu_k"], scale)
        ex_o, ex_l = dense_reference(*args, torch.float64)
        nv_o, nv_l = dense_reference(*args, torch.bfloat16 if case.dtype == "bf16" else torch.float16)
    lim_o = 2 * max_error(nv_o, ex_o) + EPS[case.dtype]
    lim_l = 2 * max_error(nv_l, ex_l) + EPS[case.dtype]
    return ex_o, ex_l, lim_o, lim_l


def check_case(case: Case, seed: int) -> dict:
    """One case against the float64 oracle with the tolerance rule; guard bands; a bitwise repeat."""
    import torch

    from flash_cuda import hopper

    entry = {"case": case.name, "seed": seed}
    prob = make_problem(case, seed)
    variant = case.variant()
    entry["variant"] = variant.label()
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.d)
    reasons = hopper.unsupported_reasons(
        prob["q"], prob["k"], prob["v"], prob["out"], prob["lse"], cu_seqlens_q=prob["cu_q"],
        cu_seqlens_k=prob["cu_k"], seqlen_q=prob["max_q"], seqlen_k=prob["max_k"], heads_q=case.hq,
        heads_kv=prob["hkv"], head_dim=case.d, window=case.window, softcap=case.softcap, scale=scale,
        q_descale=prob["descales"][0], k_descale=prob["descales"][1], v_descale=prob["descales"][2],
    )  # fmt: skip
    if reasons:
        raise RuntimeError("declared unsupported: " + "; ".join(reasons))
    if case.fp8:
        poison_vt_allocation(case, prob)
    run_case(case, prob)
    torch.cuda.synchronize()
    out1, lse1 = prob["out"].clone(), prob["lse"].clone()
    ex_o, ex_l, lim_o, lim_l = oracle(case, prob, scale)
    err_o, err_l = max_error(out1, ex_o), max_error(lse1, ex_l)
    guard_o = bool((prob["o_buf"][prob["o_guard"]] == SENTINEL).all())
    guard_l = bool((prob["l_buf"][prob["l_guard"]] == SENTINEL).all())
    # a second run on the same inputs must give the same bits (a moving result is a race)
    prob["out"].fill_(float("nan"))
    prob["lse"].fill_(float("nan"))
    run_case(case, prob)
    torch.cuda.synchronize()
    same = bool(torch.equal(out1.view(torch.int16), prob["out"].view(torch.int16))) and bool(
        torch.equal(lse1.view(torch.int32), prob["lse"].view(torch.int32))
    )
    ok = err_o <= lim_o and err_l <= lim_l and guard_o and guard_l and same
    entry.update(err_out=err_o, limit_out=lim_o, err_lse=err_l, limit_lse=lim_l, guard_out=guard_o,
                 guard_lse=guard_l, deterministic=same, ok=ok)  # fmt: skip
    log(f"{'PASS' if ok else 'FAIL'} {case.name:40s} {variant.label():34s} out {err_o:.2e}/{lim_o:.2e} "
        f"lse {err_l:.2e}/{lim_l:.2e} guard {guard_o and guard_l} repeat-identical {same}")  # fmt: skip
    if not ok:
        entry["diagnosis"] = diagnose("out", out1, ex_o, lim_o) + "\n" + diagnose("lse", lse1, ex_l, lim_l)
        log(entry["diagnosis"])
    return entry


def selected_cases(only: str | None) -> list[Case]:
    """The check cases whose names contain one of the comma-separated substrings of ``only`` (None: all)."""
    cases = check_cases()
    return [c for c in cases if any(o in c.name for o in only.split(","))] if only else cases


def phase_check(args) -> int:
    import torch

    results = []
    cases = selected_cases(args.only)
    failures = 0
    for index, case in enumerate(cases):
        seed = 1000 + index + int(time.time()) % 1000
        try:
            entry = check_case(case, seed)
        except Exception as error:  # a launch or compile error: report it, then continue if CUDA still works
            entry = {"case": case.name, "seed": seed, "ok": False, "error": f"{type(error).__name__}: {error}"}
            log(f"ERROR {case.name}: {type(error).__name__}: {str(error)[:2000]}")
            traceback.print_exc()
            try:
                torch.cuda.synchronize()
            except Exception:
                log("CUDA context is broken: stopping the check phase")
                failures += 1
                results.append(entry)
                break
        failures += not entry["ok"]
        results.append(entry)
    with open(os.path.join(OUT, "check.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    log(f"check: {len(results) - failures} of {len(cases)} passed")
    return 1 if failures else 0


# ------------------------------------------------------------------ compile


def _compile_one(item):
    import cupy  # noqa: F401

    from flash_cuda import hopper, hopper_variants

    variant = hopper_variants.HopperVariant(**item)
    t = time.time()
    try:
        hopper.kernel(variant, 0)
        return variant.label(), round(time.time() - t, 1), None
    except Exception as error:
        return variant.label(), round(time.time() - t, 1), f"{type(error).__name__}: {str(error)[:3000]}"


def all_variants(only: str | None = None):
    """The variants of the run: every shipped one (with ``only``: none), the selected check cases' and
    the bench cases'."""
    from flash_cuda import hopper_tiles, hopper_variants

    found = set() if only else set(hopper_variants.shipped_variants())
    for case in selected_cases(only):
        found.add(case.variant())
    for bc in bench_cases(os.environ.get("HOPPER_BENCH")):
        window = (-1, 0) if bc.causal else (-1, -1)
        mask = hopper_tiles.mask_kind(window)
        for cfg in bc.configs:
            config = hopper_tiles.HopperConfig(*cfg) if cfg else hopper_tiles.config_for(bc.d, window, bc.seqlen)
            found.add(hopper_variants.make_variant(config, bc.d, "bf16", mask))
        if bc.d in hopper_tiles.FP8_HEAD_DIMS:
            fp8 = hopper_tiles.config_for(bc.d, window, bc.seqlen, fp8=True)
            found.add(hopper_variants.make_variant(fp8, bc.d, "e4m3", mask))
    return sorted(found, key=lambda v: v.label())


def phase_compile(args) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    variants = all_variants(args.only)
    log(f"compiling {len(variants)} variants")
    bad = 0
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4), mp_context=get_context("spawn")) as pool:
        for label, seconds, error in pool.map(_compile_one, [asdict(v) for v in variants]):
            log(f"  {'ok ' if error is None else 'BAD'} {label:40s} {seconds:5.1f} s {error or ''}")
            bad += error is not None
    return 1 if bad else 0


# ------------------------------------------------------------------ bench


def phase_bench(args) -> int:
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flash_cuda import hopper, hopper_tiles

    rows = []
    tokens, width = 16384, 2048
    for bc in bench_cases(os.environ.get("HOPPER_BENCH")):
        b, h, s, d = tokens // bc.seqlen, width // bc.d, bc.seqlen, bc.d  # d96, d192: 21, 10 heads
        window = (-1, 0) if bc.causal else (-1, -1)
        flops = 4 * b * h * s * s * d / (2 if bc.causal else 1)
        g = torch.Generator(device="cuda").manual_seed(s + d)
        q, k, v = (torch.randn(b, s, h, d, generator=g, device="cuda").bfloat16() for _ in range(3))
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        scale = 1 / math.sqrt(d)
        row = {"d": d, "seqlen": s, "batch": b, "heads": h, "causal": bc.causal}

        def graphed(fn):
            """fn captured in a CUDA graph: replays time the GPU work without host launch overhead."""
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return graph.replay

        def tflops(fn):
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            return flops / ms / 1e9

        peers = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION))

        def time_peers(suffix: str) -> None:
            for name, backend in peers[: 2 if not suffix else 1]:
                try:
                    with sdpa_kernel(backend):
                        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=bc.causal)  # noqa: E731
                        fn()
                        row[name + suffix] = tflops(fn)
                        if s <= 1024 and not suffix:
                            row[f"graph {name}"] = tflops(graphed(fn))
                except Exception as error:
                    row[name + suffix] = None
                    log(f"  {name} failed: {error}")

        time_peers("")
        ref_out = None
        for cfg in bc.configs:
            config = hopper_tiles.HopperConfig(*cfg) if cfg else hopper_tiles.config_for(d, window, s)
            label = (
                "table"
                if cfg is None
                else "c{}x{}{}{}".format(cfg[0], cfg[1], cfg[2][:1] if cfg[2:] else "", "q2" if cfg[3:] == (2,) else "")
            )
            try:
                fn = lambda: hopper.forward(  # noqa: E731
                    q, k, v, out, lse, seqlen_q=s, seqlen_k=s, heads_q=h, heads_kv=h, head_dim=d, window=window,
                    scale=scale, config=config,
                )  # fmt: skip
                fn()
                torch.cuda.synchronize()
                if cfg is None:
                    m_blocks = -(-s // config.block_m)
                    row["order"] = hopper_tiles.tile_order(
                        config, m_blocks=m_blocks, pairs=b * h, grid=132, seqlen_q=s, seqlen_k=s, window=window,
                        varlen=False,
                    )  # fmt: skip
                if ref_out is None:  # spot check against SDPA on the timed shape
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        ref_out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=bc.causal)
                diff = (out.transpose(1, 2).float() - ref_out.float()).abs().max().item()
                row[label] = tflops(fn)
                row[label + " maxdiff"] = diff
                if s <= 1024 and cfg is None:
                    row["graph ours"] = tflops(graphed(fn))
                log(f"  d{d} s{s} {'causal' if bc.causal else 'full'} {label} ({config}): {row[label]:.1f} "
                    f"TFLOP/s, max |out - cuDNN| {diff:.3g}")  # fmt: skip
            except Exception as error:
                row[label] = None
                log(f"  {label} failed: {type(error).__name__}: {error}")
                traceback.print_exc()
        if d in hopper_tiles.FP8_HEAD_DIMS:
            bench_fp8(row, bc, (q, k, v, out, lse), ref_out, tflops)
        time_peers(" again")  # cuDNN's speed moved by up to 13% between processes: timed before and after ours
        rows.append(row)
        log(json.dumps(row))
    with open(os.path.join(OUT, "bench.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    log("\nTFLOP/s (bf16, 16k tokens, 2048 = heads * d); ratio = ours (table) / the faster cuDNN timing")
    log(
        f"{'case':22s} {'ours':>7s} {'cuDNN':>7s} {'FA2':>7s} {'ratio':>6s} {'fp8':>7s} {'x bf16':>6s}  "
        "cuDNN again; graphed ours/cuDNN/FA2"
    )
    for r in rows:
        ours, fa2 = r.get("table"), r.get("fa2")
        cudnn = max(r.get("cudnn") or 0, r.get("cudnn again") or 0) or None  # the faster of its two timings
        ratio = f"{ours / cudnn:.3f}" if ours and cudnn else "-"
        cands = " ".join(f"{k}={r[k]:.0f}" for k in r if k[:2] in ("c2", "c3") and " " not in k and r[k])
        if r.get("order"):
            cands = f"[{r['order']}] " + cands
        cands = f"cuDNN {r.get('cudnn') or 0:.0f}/{r.get('cudnn again') or 0:.0f} " + cands
        if r.get("graph ours"):
            cands += " | graph " + "/".join(f"{r.get('graph ' + n) or 0:.0f}" for n in ("ours", "cudnn", "fa2"))
        case = f"d{r['d']} s{r['seqlen']} {'causal' if r['causal'] else 'full'}"
        fmt = lambda x: f"{x:7.1f}" if x else "      -"  # noqa: E731
        fp8 = r.get("fp8")
        over_bf16 = f"{fp8 / ours:.2f}" if fp8 and ours else "-"
        log(f"{case:22s} {fmt(ours)} {fmt(cudnn)} {fmt(fa2)} {ratio:>6s} {fmt(fp8)} {over_bf16:>6s}  {cands}")
    log_prepass(rows)
    return 0


def bench_fp8(row: dict, bc: BenchCase, tensors: tuple, ref_out, tflops) -> None:
    """The bench case in e4m3 (per-head descales), bf16 out, into ``row``: "fp8" (the call, V^T
    pre-pass included); with time_prepass also the pre-pass alone."""
    import torch

    from flash_cuda import hopper

    q, k, v, out, lse = tensors
    _, s, h, d = q.shape
    window = (-1, 0) if bc.causal else (-1, -1)
    (q8, qd), (k8, kd), (v8, vd) = (quantize(t, "e4m3", per_head=True) for t in (q, k, v))
    try:
        fn = lambda: hopper.forward(  # noqa: E731
            q8, k8, v8, out, lse, seqlen_q=s, seqlen_k=s, heads_q=h, heads_kv=h, head_dim=d, window=window,
            scale=1 / math.sqrt(d), q_descale=qd, k_descale=kd, v_descale=vd,
        )  # fmt: skip
        fn()
        torch.cuda.synchronize()
        row["fp8"] = tflops(fn)
        row["fp8 maxdiff"] = (out.transpose(1, 2).float() - ref_out.float()).abs().max().item()
        log(f"  d{d} s{s} {'causal' if bc.causal else 'full'} fp8 e4m3: {row['fp8']:.1f} TFLOP/s, "
            f"max |out - cuDNN bf16| {row['fp8 maxdiff']:.3g}")  # fmt: skip
    except Exception as error:
        row["fp8"] = None
        log(f"  fp8 failed: {type(error).__name__}: {error}")
        traceback.print_exc()
    if bc.time_prepass:
        bench_prepass(row, v8)


def bench_prepass(row: dict, v8) -> None:
    """The fp8 V^T pre-pass of ``v8`` alone into ``row``: its time, bytes moved, and its output against
    the torch reference."""
    import torch
    import triton

    from flash_cuda import hopper

    b, s, h, d = v8.shape
    prepass = hopper.plan_vt(v8, False, b, s, h, d, v8.get_device())
    vt = torch.empty(prepass.shape, dtype=v8.dtype, device=v8.device)
    fn = lambda: hopper.transpose_v_into(prepass, v8, None, vt, v8.get_device())  # noqa: E731
    fn()
    same = torch.equal(vt.view(torch.uint8), vt_reference(v8, None, s, prepass.shape).view(torch.uint8))
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    row.update({"prepass us": ms * 1e3, "prepass MB": prepass.bytes_moved / 1e6,
                "prepass GB/s": prepass.bytes_moved / ms / 1e6, "prepass exact": same})  # fmt: skip
    log(f"  pre-pass: {ms * 1e3:.1f} us, {prepass.bytes_moved / 1e6:.1f} MB moved "
        f"({row['prepass GB/s']:.0f} GB/s), as the torch reference: {same}")  # fmt: skip


def log_prepass(rows: list[dict]) -> None:
    """The fp8 pre-pass's table: its own time and traffic, next to the call that includes it."""
    rows = [r for r in rows if "prepass us" in r]
    if not rows:
        return
    log("\nfp8 V^T pre-pass (e4m3; the call's TFLOP/s include it)")
    log(f"{'case':22s} {'bf16':>7s} {'fp8':>7s} {'x bf16':>6s}  pre-pass us / MB / GB/s, exact")
    for r in rows:
        case = f"d{r['d']} s{r['seqlen']} {'causal' if r['causal'] else 'full'}"
        ours, fp8 = r.get("table") or 0, r.get("fp8") or 0
        over = f"{fp8 / ours:.2f}" if fp8 and ours else "-"
        prepass = "{:.1f} / {:.1f} / {:.0f}".format(*(r[f"prepass {x}"] for x in ("us", "MB", "GB/s")))
        log(f"{case:22s} {ours:7.1f} {fp8:7.1f} {over:>6s}  {prepass}, {r['prepass exact']}")


def vt_reference(v, cu_k, seqlen_k: int, shape: tuple[int, int, int, int]):
    """What the fp8 forward's V^T pre-pass writes, by torch ops: per (sequence, KV head) head_dim rows of
    the keys, padded with zeros to whole 32-key steps, each step's column 16h + 4t + 2a + c holding its
    key 16h + 8a + 2t + c (P's register order); varlen (consistent cu_k): sequence i from column
    32 (ceil(start / 32) + i), zeros between sequences."""
    import torch

    vt = torch.zeros(shape, dtype=torch.uint8, device=v.device)
    if cu_k is None:
        spans = [(i, 0, min(seqlen_k, v.shape[1]), 0) for i in range(v.shape[0])]
    else:
        cu = cu_k.tolist()
        spans = [(0, cu[i], min(cu[i + 1] - cu[i], seqlen_k), 32 * (-(-cu[i] // 32) + i)) for i in range(len(cu) - 1)]
    for batch, start, length, column in spans:
        keys = v[batch, start : start + length].view(torch.uint8).permute(1, 2, 0)  # (heads, head_dim, keys)
        padded = torch.nn.functional.pad(keys, (0, 32 * -(-length // 32) - length))
        # a step's keys as digits (h, a, t, c), reordered to the columns' (h, t, a, c)
        steps = padded.reshape(*padded.shape[:2], -1, 2, 2, 4, 2).permute(0, 1, 2, 3, 5, 4, 6).flatten(2)
        vt[0 if cu_k is not None else batch, :, :, column : column + steps.shape[-1]] = steps
    return vt.view(v.dtype)


# ------------------------------------------------------------------ sanitizer

SANITIZE_SNIPPET = """
import sys, torch
sys.path.insert(0, {src!r})
sys.path.insert(0, {here!r})
import hopper_check as hc
case = hc.Case("sanitize", d=128, b=1, sq=300, sk=333, hq=2, hkv=1, window=(-1, 0), varlen=None)
prob = hc.make_problem(case, 7)
hc.run_case(case, prob)
case2 = hc.Case("sanitize varlen", d=64, varlen=[70, 1, 200], window=(20, 5))
prob2 = hc.make_problem(case2, 8)
hc.run_case(case2, prob2)
torch.cuda.synchronize()
print("sanitize run done")
"""


def phase_sanitize(args) -> int:
    snippet = SANITIZE_SNIPPET.format(src=SRC, here=HERE)
    status = 0
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9", sys.executable, "-c", snippet]
        t = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.sanitize_timeout, check=False)
            text = (r.stdout + r.stderr)[-3000:]
            summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
            log(f"sanitize {tool}: rc {r.returncode} in {time.time() - t:.0f} s; {summary}")
            if r.returncode:
                log(text)
                status = 1
        except subprocess.TimeoutExpired:
            log(f"sanitize {tool}: timed out after {args.sanitize_timeout} s")
            status = 1
        except FileNotFoundError:
            log("compute-sanitizer not found")
            return 1
    return status


# ------------------------------------------------------------------ driver


def environment() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["nvrtc"] = list(cupy.cuda.nvrtc.getVersion())
        info["driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as error:
        info["cupy"] = f"unavailable: {error}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


PHASES = {
    "compile": phase_compile,
    "smoke": None,
    "check": phase_check,
    "bench": phase_bench,
    "sanitize": phase_sanitize,
}
#: Seconds each phase may take; a phase that runs out (a hung kernel) stops the run.
LIMITS = {"compile": 120, "smoke": 45, "check": 150, "bench": 150, "sanitize": 150}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), help="run one phase in this process")
    parser.add_argument("--phases", default="compile,smoke,check,bench,sanitize")
    parser.add_argument("--only", help="check (and compile): comma-separated substrings of case names")
    parser.add_argument("--timeout", type=int, help="seconds per phase (default: LIMITS)")
    parser.add_argument("--sanitize-timeout", type=int, default=45)
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.phase:
        if args.phase == "smoke":
            args.only = check_cases()[0].name
            return phase_check(args)
        return PHASES[args.phase](args)
    env = environment()
    log(json.dumps(env))
    with open(os.path.join(OUT, "env.json"), "w") as fh:
        json.dump(env, fh, indent=1)
    statuses = {}
    for phase in args.phases.split(","):
        t = time.time()
        limit = args.timeout or LIMITS[phase]
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--phase",
            phase,
            "--sanitize-timeout",
            str(args.sanitize_timeout),
        ]
        if args.only and phase != "smoke":
            cmd += ["--only", args.only]
        log(f"\n===== phase {phase}")
        path = os.path.join(OUT, f"{phase}.log")
        with open(path, "w") as fh:
            try:
                run = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=limit, check=False)
                statuses[phase] = run.returncode
            except subprocess.TimeoutExpired:
                statuses[phase] = f"killed after {limit} s"
        with open(path) as fh:
            for line in fh:
                if phase != "compile" or not line.startswith("  ok"):
                    sys.stdout.write(line)
        log(f"===== phase {phase}: rc {statuses[phase]} in {time.time() - t:.0f} s")
        if isinstance(statuses[phase], str):
            log(f"phase {phase} did not finish (a hung kernel?): stopping here")
            break
    log(f"\nphases: {statuses}")
    return 0 if all(s == 0 for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
