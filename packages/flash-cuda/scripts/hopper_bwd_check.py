"""GPU harness of the Hopper backward kernel (flash_cuda.hopper_bwd): compile, check, bench.

Run from the repository root on an sm_90 machine, without installing anything:

    PYTHONPATH=packages/flash-core/src:packages/flash-triton/src:packages/flash-cuda/src \\
        python3 packages/flash-cuda/scripts/hopper_bwd_check.py [--phases compile,check,bench]

Phases, each in its own subprocess with a time limit (a hung kernel costs one phase, not the run):

1. compile -- the variants the checks use (fills CuPy's disk cache);
2. check   -- dQ, dK, dV of each case against float64 autograd of dense attention with the tolerance
              rule (max error <= 2 x the error of the same computation in the inputs' dtype + eps),
              gradients poisoned with NaN inside guard bands of a sentinel that must survive;
              deterministic cases run RUNS times and must give bit-identical gradients; packed
              (varlen) batches also against the same sequences run one by one (dK, dV bit for bit,
              dQ up to the order of its fp32 reductions);
3. bench   -- backward and forward+backward TFLOP/s of flash's cuda backend (Hopper forward + this
              backward), flash's triton backend and torch SDPA's cuDNN backend in the same process
              (bf16, batch * seqlen = 16k tokens, heads * head_dim = 2048; FLOPs: forward
              4 b h s^2 d, backward 2.5x that, causal halved; triton's do_bench medians); the
              kernel alone per consumer structure, and deterministic against not; the backward of a
              packed batch against the same tokens at fixed length.

Logs and a JSON of the results go to $OUT (or ./hopper_bwd_out).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace

OUT = os.environ.get("OUT") or os.path.join(os.getcwd(), "hopper_bwd_out")
HERE = os.path.dirname(os.path.abspath(__file__))


def log(*parts: object) -> None:
    print(*parts, flush=True)


@dataclass
class Case:
    name: str
    d: int = 128
    b: int = 2
    sq: int = 200
    sk: int | None = None
    hq: int = 2
    hkv: int | None = None
    window: tuple[int, int] = (-1, -1)
    dtype: str = "bf16"
    layout: str = "bshd"  # or bhsd (heads outer: strided canonical views)
    pipelined: bool | None = None  # the consumer structure (None: hopper_bwd.PIPELINED)
    softcap: float = 0.0
    deterministic: bool = False  # also: RUNS runs, bit-identical gradients


def _default_pipelined(d: int) -> bool:
    from flash_cuda import hopper_bwd

    return hopper_bwd.PIPELINED[hopper_bwd.compiled_head_dim(d)]


def check_cases() -> list[Case]:
    return [
        Case("basic d128", b=1, sq=128, hq=1),
        Case("full d64 odd", d=64, sq=200, sk=333, hq=3),
        Case("full d128 odd", sq=333, sk=200),
        Case("causal d128", sq=333, window=(-1, 0)),
        Case("causal d64 sq<sk", d=64, sq=200, sk=333, window=(-1, 0)),
        Case("causal sq>sk (rows without keys)", sq=300, sk=100, window=(-1, 0)),
        Case("gqa 8/2 d128", hq=8, hkv=2, sq=200, sk=300),
        Case("mqa 6/1 causal d64", d=64, hq=6, hkv=1, sq=257, window=(-1, 0)),
        Case("fp16 causal d128", dtype="fp16", sq=257, sk=400, window=(-1, 0)),
        Case("window (40, 7) d128", sq=400, sk=450, window=(40, 7)),
        Case("head dim 40 -> 64", d=40, sq=150),
        Case("head dim 96 -> 128", d=96, sq=190, window=(-1, 0)),
        Case("layout bhsd gqa", layout="bhsd", hq=4, hkv=2, sq=190),
        Case("many blocks causal", b=2, sq=1024, hq=4, window=(-1, 0)),
        Case("fp16 window (16, 16) d64", d=64, dtype="fp16", sq=300, window=(16, 16)),
        Case("sq 1, sk 1000", sq=1, sk=1000),
        Case("sq 1000, sk 1 causal", d=64, sq=1000, sk=1, window=(-1, 0)),
        Case("many blocks gqa d64 full", d=64, b=2, sq=700, sk=900, hq=8, hkv=2),
        Case("window left only (100, -1)", sq=500, window=(100, -1)),
        Case("one step d64", d=64, b=1, sq=64, hq=1),
        Case("two steps d64", d=64, b=1, sq=128, sk=100, hq=1),
        Case("three steps gqa 3/1 d64 causal", d=64, b=1, sq=64, sk=64, hq=3, hkv=1, window=(-1, 0)),
        Case("bhsd d64 window", d=64, layout="bhsd", hq=4, hkv=2, sq=333, window=(60, 3)),
        Case("one step d128 causal", b=1, sq=64, sk=64, hq=1, window=(-1, 0)),
        # softcap: cap 30 (Gemma-like, tanh nearly linear) and cap 2 (the derivative far from 1)
        Case("softcap 30 full d128 odd", sq=333, sk=200, softcap=30.0),
        Case("softcap 2 full d64 odd", d=64, sq=200, sk=333, hq=3, softcap=2.0),
        Case("softcap 2 causal d128", sq=333, window=(-1, 0), softcap=2.0),
        Case("softcap 2 causal d64 sq>sk", d=64, sq=300, sk=100, window=(-1, 0), softcap=2.0),
        Case("softcap 5 gqa 8/2 d128 causal", hq=8, hkv=2, sq=200, sk=300, window=(-1, 0), softcap=5.0),
        Case("softcap 5 mqa 6/1 d64", d=64, hq=6, hkv=1, sq=257, softcap=5.0),
        Case("softcap 2 fp16 window (40, 7) d128", dtype="fp16", sq=400, sk=450, window=(40, 7), softcap=2.0),
        Case("softcap 2 head dim 40 -> 64", d=40, sq=150, softcap=2.0),
        # deterministic: several key blocks add to every query block's dQ
        Case("deterministic full d128", sq=500, sk=900, deterministic=True),
        Case("deterministic causal d128", sq=900, window=(-1, 0), deterministic=True),
        Case("deterministic gqa 8/2 d128 causal", hq=8, hkv=2, sq=300, sk=700, window=(-1, 0), deterministic=True),
        Case("deterministic full d64", d=64, sq=700, sk=900, hq=3, deterministic=True),
        Case("deterministic gqa 8/2 d64 causal", d=64, hq=8, hkv=2, sq=1000, window=(-1, 0), deterministic=True),
        Case("deterministic window (200, 30) d64", d=64, sq=800, sk=900, window=(200, 30), deterministic=True),
        Case("deterministic fp16 window (300, 0) d128", dtype="fp16", sq=700, window=(300, 0), deterministic=True),
        Case("deterministic softcap 5 causal d128", sq=700, window=(-1, 0), softcap=5.0, deterministic=True),
        Case("deterministic sq 1, sk 1000", sq=1, sk=1000, deterministic=True),
        *[
            replace(c, name=f"{'step-synchronous' if other == 0 else 'pipelined'}: {c.name}", pipelined=bool(other))
            for c in (
                Case("full d64 odd", d=64, sq=200, sk=333, hq=3),
                Case("mqa 6/1 causal d64", d=64, hq=6, hkv=1, sq=257, window=(-1, 0)),
                Case("many blocks gqa d64 full", d=64, b=2, sq=700, sk=900, hq=8, hkv=2),
                Case("sq 1000, sk 1 causal", d=64, sq=1000, sk=1, window=(-1, 0)),
                Case("fp16 window (16, 16) d64", d=64, dtype="fp16", sq=300, window=(16, 16)),
                Case("one step d64", d=64, b=1, sq=64, hq=1),
                Case("two steps d64", d=64, b=1, sq=128, sk=100, hq=1),
                Case("three steps gqa 3/1 d64 causal", d=64, b=1, sq=64, sk=64, hq=3, hkv=1, window=(-1, 0)),
                Case("bhsd d64 window", d=64, layout="bhsd", hq=4, hkv=2, sq=333, window=(60, 3)),
                Case("softcap 2 causal d64 sq>sk", d=64, sq=300, sk=100, window=(-1, 0), softcap=2.0),
                Case("deterministic full d64", d=64, sq=700, sk=900, hq=3, deterministic=True),
                Case("deterministic mqa 4/1 d64 causal", d=64, hq=4, hkv=1, sq=900, window=(-1, 0), deterministic=True),
            )
            for other in [int(not _default_pipelined(c.d))]
        ],
    ]


@dataclass
class VarlenCase:
    """A packed batch: the sequences' query and key lengths (keys: the queries' when None)."""

    name: str
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...] | None = None
    d: int = 128
    hq: int = 2
    hkv: int | None = None
    window: tuple[int, int] = (-1, -1)
    dtype: str = "bf16"
    pipelined: bool | None = None


def varlen_cases() -> list[VarlenCase]:
    return [
        VarlenCase("varlen odd d128", (70, 1, 257, 130)),
        VarlenCase("varlen empty middle d64", (100, 0, 200), (150, 0, 90), d=64),
        VarlenCase("varlen causal d128", (300, 65, 128, 7), window=(-1, 0)),
        VarlenCase("varlen causal sq>sk gqa 4/2 d64", (200, 50, 129), (90, 50, 300), d=64, hq=4, hkv=2, window=(-1, 0)),
        VarlenCase("varlen fp16 window (40, 7) d128", (333, 0, 64), (400, 30, 0), dtype="fp16", window=(40, 7)),
        VarlenCase("varlen fp16 mqa 6/1 causal d64", (129, 1, 64), d=64, hq=6, hkv=1, dtype="fp16", window=(-1, 0)),
        VarlenCase("varlen no queries, keys d64", (0, 80), (100, 80), d=64),
        VarlenCase("varlen head dim 40 -> 64", (90, 33), d=40),
        VarlenCase("varlen 13 sequences gqa causal", tuple(range(1, 40, 3)), hq=4, hkv=2, window=(-1, 0)),
        VarlenCase("varlen bf16 window (16, 16) d64", (300, 17, 0, 190), d=64, window=(16, 16)),
        VarlenCase("varlen step-synchronous d64", (100, 0, 200), (150, 0, 90), d=64, pipelined=False),
    ]


def variants_of(cases: list[Case | VarlenCase]) -> list:
    from flash_cuda import hopper_bwd, hopper_tiles

    out = []
    for c in cases:
        d = hopper_bwd.compiled_head_dim(c.d)
        pipelined = hopper_bwd.PIPELINED[d] if c.pipelined is None else c.pipelined
        mask = hopper_tiles.mask_kind(c.window)
        packed = isinstance(c, VarlenCase)
        v = hopper_bwd.BwdVariant(d, c.dtype, mask, pipelined, packed, not packed and c.deterministic,
                                  not packed and c.softcap > 0)  # fmt: skip
        if v not in out:
            out.append(v)
    return out


# ------------------------------------------------------------------ reference


def dense(q, k, v, window, scale, softcap=0.0):
    """Dense attention of canonical (b, s, h, d) tensors (any dtype, autograd-able): out (b, s, h, d)."""
    import torch

    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, dim=2)
    vv = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = q.shape[1], k.shape[1]
    i = torch.arange(lq, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None, :]
    delta = j - i - (lk - lq)
    seen = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    left, right = window
    if right >= 0:
        seen &= delta <= right
    if left >= 0:
        seen &= delta >= -left
    s = s.masked_fill(~seen, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    lse = (torch.log(den) + m).squeeze(-1)  # (b, h, q)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


SENTINEL = 1024.0
EPS = {"bf16": 1e-4, "fp16": 1e-5}
RUNS = 5  # of a deterministic case, bit-identical


def offsets(lengths) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def dense_packed(q, k, v, cu_q, cu_k, window, scale):
    """dense() sequence by sequence of packed (1, tokens, h, d) tensors: out (1, tokens, h, d), lse (1, h,
    tokens); a sequence without queries or keys has output 0 and LSE -inf (and no gradient)."""
    import torch

    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        (qa, qb), (ka, kb) = cu_q[b : b + 2], cu_k[b : b + 2]
        if qb > qa and kb > ka:
            o, lse = dense(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], window, scale)
        else:
            o = q[:, qa:qb] * 0
            lse = torch.full((1, q.shape[2], qb - qa), -math.inf, dtype=q.dtype, device=q.device)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def guarded_like(t):
    """A NaN-filled view shaped and strided like contiguous `t` inside a sentinel buffer."""
    import torch

    n = t.numel()
    buf = torch.full((n + 96,), SENTINEL, dtype=t.dtype, device=t.device)
    view = buf[32 : 32 + n].view(t.shape)
    view.fill_(float("nan"))
    return buf, view


def check_case(case: Case, seed: int) -> dict:
    import torch

    from flash_cuda import hopper_bwd

    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float16
    g = torch.Generator(device="cuda").manual_seed(seed)
    hkv = case.hkv or case.hq
    sk = case.sk or case.sq

    def rnd(s, h):
        if case.layout == "bhsd":
            return torch.randn(case.b, h, s, case.d, generator=g, device="cuda").to(dtype).transpose(1, 2)
        return torch.randn(case.b, s, h, case.d, generator=g, device="cuda").to(dtype)

    q, k, v, do = rnd(case.sq, case.hq), rnd(sk, hkv), rnd(sk, hkv), rnd(case.sq, case.hq)
    scale = 1.0 / math.sqrt(case.d)
    # the oracle: float64 autograd
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = dense(q64, k64, v64, case.window, scale, case.softcap)
    exact = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    # the naive same-precision computation
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    on, _ = dense(qn, kn, vn, case.window, scale, case.softcap)
    naive = torch.autograd.grad(on, (qn, kn, vn), do)
    out = o64.detach().to(dtype)
    lse = lse64.detach().float()
    bufs = [guarded_like(t.contiguous()) for t in (q, k, v)]
    dq, dk, dv = (view for _, view in bufs)

    def run(grads):
        hopper_bwd.backward(
            q, k, v, out, lse, do, *grads, heads_q=case.hq, heads_kv=hkv, head_dim=case.d, window=case.window,
            scale=scale, softcap=case.softcap, deterministic=case.deterministic, pipelined=case.pipelined,
        )  # fmt: skip

    run((dq, dk, dv))
    torch.cuda.synchronize()
    entry: dict = {"case": case.name, "seed": seed, "variant": variants_of([case])[0].label(), "ok": True}
    if case.deterministic:
        entry["bitwise"] = bitwise_repeats(run, (dq, dk, dv))
        entry["ok"] = entry["bitwise"]
    grad_errors(entry, (dq, dk, dv), exact, naive, bufs, case.dtype)
    return entry


def grad_errors(entry: dict, got, exact, naive, bufs, dtype: str) -> None:
    """Per gradient: the error against the oracle, the naive same-precision error, the limit, the guard
    bands; entry["ok"] and each gradient's "ok" updated."""
    for name, g, ex, nv, (buf, _) in zip(("dq", "dk", "dv"), got, exact, naive, bufs):
        err = (g.double() - ex).abs().nan_to_num(math.inf).max().item()
        naive_err = (nv.double() - ex).abs().max().item()
        limit = 2 * naive_err + EPS[dtype]
        guard_ok = bool((buf[:32] == SENTINEL).all() and (buf[32 + g.numel() :] == SENTINEL).all())
        ok = err <= limit and guard_ok
        entry[name] = {"err": err, "naive": naive_err, "limit": limit, "guards": guard_ok, "ok": ok}
        entry["ok"] = entry["ok"] and ok
        if not ok:
            entry[name]["first_bad"] = ((g.double() - ex).abs().nan_to_num(math.inf) > limit).nonzero()[:5].tolist()


def check_varlen_case(case: VarlenCase, seed: int) -> dict:
    """A packed batch against the float64 oracle, sequence by sequence, and against the same sequences
    run one by one at fixed length (those with queries and keys; the others' gradients are zeros)."""
    import torch

    from flash_cuda import hopper_bwd

    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float16
    g = torch.Generator(device="cuda").manual_seed(seed)
    hkv = case.hkv or case.hq
    lengths_k = case.lengths_k or case.lengths_q
    cu_q, cu_k = offsets(case.lengths_q), offsets(lengths_k)
    rnd = lambda s, h: torch.randn(1, s, h, case.d, generator=g, device="cuda").to(dtype)  # noqa: E731
    q, k, v, do = rnd(cu_q[-1], case.hq), rnd(cu_k[-1], hkv), rnd(cu_k[-1], hkv), rnd(cu_q[-1], case.hq)
    scale = 1.0 / math.sqrt(case.d)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = dense_packed(q64, k64, v64, cu_q, cu_k, case.window, scale)
    exact = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    on, _ = dense_packed(qn, kn, vn, cu_q, cu_k, case.window, scale)
    naive = torch.autograd.grad(on, (qn, kn, vn), do)
    out, lse = o64.detach().to(dtype), lse64.detach().float()
    bufs = [guarded_like(t) for t in (q, k, v)]
    dq, dk, dv = (view for _, view in bufs)
    cu = [torch.tensor(c, dtype=torch.int32, device="cuda") for c in (cu_q, cu_k)]
    common = dict(heads_q=case.hq, heads_kv=hkv, head_dim=case.d, window=case.window, scale=scale,
                  pipelined=case.pipelined)  # fmt: skip
    hopper_bwd.backward(
        q, k, v, out, lse, do, dq, dk, dv, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1],
        max_seqlen_q=max(case.lengths_q), max_seqlen_k=max(lengths_k), **common,
    )  # fmt: skip
    torch.cuda.synchronize()
    entry: dict = {"case": case.name, "seed": seed, "variant": variants_of([case])[0].label(), "ok": True}
    grad_errors(entry, (dq, dk, dv), exact, naive, bufs, case.dtype)
    # the same sequences one by one (fixed length, batch 1)
    eps = torch.finfo(dtype).eps
    alone = {"dk_equal": True, "dv_equal": True, "dq_excess": 0.0}
    for b in range(len(case.lengths_q)):
        (qa, qb), (ka, kb) = cu_q[b : b + 2], cu_k[b : b + 2]
        if qb == qa or kb == ka:
            continue
        one = [t.contiguous() for t in (q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], out[:, qa:qb], do[:, qa:qb])]
        grads = [torch.empty_like(t) for t in one[:3]]
        hopper_bwd.backward(*one[:4], lse[:, :, qa:qb], one[4], *grads, **common)
        alone["dk_equal"] &= torch.equal(grads[1], dk[:, ka:kb])
        alone["dv_equal"] &= torch.equal(grads[2], dv[:, ka:kb])
        # dQ: fp32 bulk reductions in any order, then one rounding: at most about an ulp apart
        ref, got = grads[0].float(), dq[:, qa:qb].float()
        excess = ((got - ref).abs() - 2 * eps * ref.abs() - 1e-3 * ref.abs().max()).max().item()
        alone["dq_excess"] = max(alone["dq_excess"], excess)
    torch.cuda.synchronize()
    alone["ok"] = alone["dk_equal"] and alone["dv_equal"] and alone["dq_excess"] <= 0
    entry["one_by_one"] = alone
    entry["ok"] = entry["ok"] and alone["ok"]
    return entry


def bitwise_repeats(run, first) -> bool:
    """Whether RUNS - 1 more runs of ``run(grads)`` give gradients bit for bit equal to ``first``."""
    import torch

    for _ in range(RUNS - 1):
        again = [torch.empty_like(t) for t in first]
        run(again)
        torch.cuda.synchronize()
        if not all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(again, first)):
            return False
    return True


# ------------------------------------------------------------------ phases


def phase_compile(args) -> None:
    import torch

    from flash_cuda import hopper_bwd

    torch.cuda.init()
    for dtype in hopper_bwd.DTYPES:
        t = time.time()
        hopper_bwd.row_kernels(dtype, 0)
        log(f"compiled the {dtype} row passes in {time.time() - t:.1f}s")
    for v in variants_of([*check_cases(), *varlen_cases()]):
        t = time.time()
        hopper_bwd.kernel(v, 0)
        log(f"compiled {v.label()} in {time.time() - t:.1f}s")


def phase_check(args) -> None:
    results = []
    for case in [*check_cases(), *varlen_cases()]:
        try:
            check = check_varlen_case if isinstance(case, VarlenCase) else check_case
            entry = check(case, seed=len(results) + 1)
        except Exception:
            entry = {"case": case.name, "ok": False, "error": traceback.format_exc()[-2000:]}
        results.append(entry)
        mark = "PASS" if entry["ok"] else "FAIL"
        detail = " ".join(
            f"{n} {entry[n]['err']:.2e}/{entry[n]['limit']:.2e}{'' if entry[n]['guards'] else ' GUARD'}"
            for n in ("dq", "dk", "dv")
            if n in entry
        )
        alone = entry.get("one_by_one")
        if alone:
            detail += f" | one by one: dK {'=' if alone['dk_equal'] else '!='} dV {'=' if alone['dv_equal'] else '!='}"
            detail += f" dQ excess {alone['dq_excess']:.1e}"
        bits = "" if "bitwise" not in entry else " bitwise" if entry["bitwise"] else " NOT BITWISE"
        log(f"{mark} {case.name:36s} {detail}{bits} {entry.get('error', '')}")
        if not entry["ok"] and "dq" in entry:
            log("   ", json.dumps({n: entry[n].get("first_bad") for n in ("dq", "dk", "dv")}))
    with open(os.path.join(OUT, "bwd_check.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    passed = sum(r["ok"] for r in results)
    log(f"checks: {passed}/{len(results)} passed")


def register_backends() -> None:
    from flash.registry import REGISTRY
    from flash_cuda.backend import CudaBackend
    from flash_triton.backend import TritonBackend

    for backend in (TritonBackend(), CudaBackend()):
        try:
            REGISTRY.register(backend)
        except Exception as error:  # already registered through an entry point
            log(f"register {backend.name}: {error}")


def phase_conformance(args) -> None:
    """flash.testing's GPU cases through flash.attention(backend="cuda"): the Hopper forward paired
    with this backward by dispatch, gradients against the float64 oracle with the 2x-naive rule."""
    from flash import dispatch
    from flash.testing import check_backward, declared_reasons, gpu_cases
    from flash.testing.conformance import make_inputs, spec_of

    register_backends()
    passed, failed, skipped = 0, [], []
    for i, case in enumerate(gpu_cases()):
        if not case.backward:
            continue
        reasons = declared_reasons("cuda", case, "cuda", "forward")
        spec = spec_of(make_inputs(case, "cuda", seed=0))
        chosen = dispatch.decide(spec, "backward", "cuda").chosen
        if reasons or chosen != "cuda":
            why = f" (forward: {'; '.join(reasons)})" if reasons else ""
            skipped.append(f"{case.name}: backward by {chosen}{why}")
            continue
        try:
            check_backward("cuda", case, "cuda", 1000 + i)
            passed += 1
        except Exception as error:
            failed.append(f"{case.name}: {str(error)[:400]}")
    for line in failed:
        log("FAIL", line)
    for line in skipped:
        log("not this backward:", line)
    log(f"conformance: {passed} passed, {len(failed)} failed, {len(skipped)} by another backward")
    with open(os.path.join(OUT, "bwd_conformance.json"), "w") as fh:
        json.dump({"passed": passed, "failed": failed, "skipped": skipped}, fh, indent=1)


def kernel_ab(args) -> list[dict]:
    """The backward alone (rows pass, main kernel, dQ pass) through hopper_bwd.backward, both consumer
    structures and the launched one in deterministic mode, per bench case; and at the first case the
    rows pass and the workspace zeroing alone."""
    import torch
    import triton

    from flash_cuda import hopper, hopper_bwd, tensor_map

    out_rows = []
    for n, (d, seqlen, causal) in enumerate(args.bench_cases):
        b, h = 16384 // seqlen, 2048 // d
        mk = lambda: torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(), mk(), mk(), mk()
        out = torch.empty_like(q)
        lse = torch.empty(b, h, seqlen, device="cuda", dtype=torch.float32)
        scale = d**-0.5
        window = (-1, 0) if causal else (-1, -1)
        hopper.forward(
            q, k, v, out, lse, seqlen_q=seqlen, seqlen_k=seqlen, heads_q=h, heads_kv=h, head_dim=d, scale=scale,
            window=window,
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flops = 2.5 * 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)
        row: dict = {"d": d, "seqlen": seqlen, "causal": causal}
        launched = hopper_bwd.PIPELINED[d]
        configs = {"step_synchronous": (False, False), "deterministic": (launched, True)}  # (pipelined, det.)
        if d in hopper_bwd.PIPELINED_HEAD_DIMS:
            configs["pipelined"] = (True, False)
        for name, (pipelined, deterministic) in configs.items():

            def run(pipelined=pipelined, deterministic=deterministic):
                hopper_bwd.backward(
                    q, k, v, out, lse, do, dq, dk, dv, heads_q=h, heads_kv=h, head_dim=d, scale=scale,
                    window=window, deterministic=deterministic, pipelined=pipelined,
                )  # fmt: skip

            ms = triton.testing.do_bench(run)
            row[name] = {"ms": ms, "tflops": flops / ms * 1e-9}
        if n == 0:
            rows_fn, _ = hopper_bwd.row_kernels("bf16", 0)
            rows_launch = tensor_map.packed_launch(rows_fn, hopper_bwd.ROWS_PARAMETERS)
            row["rows_pass_ms"] = triton.testing.do_bench(
                lambda: hopper_bwd._rows(rows_launch, out, do, lse, seqlen, h, 0)
            )
            row["zeros_ms"] = triton.testing.do_bench(
                lambda: torch.zeros(b, h, seqlen * d, device="cuda", dtype=torch.float32)
            )
        out_rows.append(row)
        pipe = f", pipelined {row['pipelined']['tflops']:.0f}" if "pipelined" in row else ""
        plain = row["pipelined" if launched else "step_synchronous"]["ms"]
        det = f"; deterministic {row['deterministic']['tflops']:.0f} ({plain / row['deterministic']['ms']:.2f}x)"
        log(
            f"kernel d{d} s{seqlen} {'causal' if causal else 'full'}: step-synchronous "
            f"{row['step_synchronous']['tflops']:.0f} TFLOP/s{pipe}{det}"
            + (f"; rows pass {row['rows_pass_ms']:.3f} ms, zeroing {row['zeros_ms']:.3f} ms of "
               f"{row['step_synchronous']['ms']:.3f}" if n == 0 else "")
        )  # fmt: skip
    return out_rows


#: The packed batch of the varlen timing: 8 sequences, 16k tokens in all (the fixed batch: 8 x 2048).
VARLEN_BENCH_LENGTHS = (4096, 512, 3072, 1024, 2048, 1536, 2560, 1536)


def varlen_bench(d: int = 128, causal: bool = False) -> dict:
    """The backward (rows pass, main kernel, dQ pass) of 16k tokens, bf16, heads * d = 2048: a fixed
    batch 8 x 2048, the same 8 x 2048 packed (the varlen variant's own cost), and uneven packed lengths
    (VARLEN_BENCH_LENGTHS, same tokens, more FLOPs: sum of len^2). TFLOP/s count each sequence's own
    scores (2.5 x 4 h d len_q len_k, causal halved)."""
    import torch
    import triton

    from flash_cuda import hopper, hopper_bwd

    h, window, scale = 2048 // d, ((-1, 0) if causal else (-1, -1)), d**-0.5
    row: dict = {"d": d, "causal": causal, "tokens": sum(VARLEN_BENCH_LENGTHS)}
    for name, lengths, packed in (
        ("fixed 8x2048", (2048,) * 8, False),
        ("varlen 8x2048", (2048,) * 8, True),
        ("varlen uneven", VARLEN_BENCH_LENGTHS, True),
    ):
        b, s = (1, sum(lengths)) if packed else (len(lengths), lengths[0])
        q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        longest = max(lengths)
        cu = torch.tensor(offsets(lengths), dtype=torch.int32, device="cuda") if packed else None
        sizes = dict(heads_q=h, heads_kv=h, head_dim=d, scale=scale, window=window)
        hopper.forward(q, k, v, out, lse, cu_seqlens_q=cu, cu_seqlens_k=cu, seqlen_q=longest, seqlen_k=longest, **sizes)
        sizes |= dict(max_seqlen_q=longest, max_seqlen_k=longest) if packed else {}
        grads = [torch.empty_like(t) for t in (q, k, v)]
        run = functools.partial(
            hopper_bwd.backward, q, k, v, out, lse, do, *grads, cu_seqlens_q=cu, cu_seqlens_k=cu, **sizes
        )
        ms = triton.testing.do_bench(run)
        flops = 2.5 * 4 * h * d * sum(n * n for n in lengths) / (2 if causal else 1)
        row[name] = {"ms": ms, "tflops": flops / ms * 1e-9}
    timings = [f"{n} {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s" for n, r in row.items() if isinstance(r, dict)]
    log(f"varlen d{d} {'causal' if causal else 'full'} 16k tokens: " + " | ".join(timings))
    return row


def phase_bench(args) -> None:
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash

    register_backends()
    ab = kernel_ab(args)
    varlen = [varlen_bench(128, False), varlen_bench(128, True)]
    rows = []
    for d, seqlen, causal in args.bench_cases:
        b, h = 16384 // seqlen, 2048 // d
        fwd_flops = 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)
        mk = lambda: torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
        q, k, v = mk(), mk(), mk()
        do = torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
        row = {"d": d, "seqlen": seqlen, "causal": causal, "batch": b, "heads": h}

        def flash_run(name):
            return lambda: flash.attention(q, k, v, causal=causal, backend=name)

        def sdpa_run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

        for name, run in (("cuda", flash_run("cuda")), ("triton", flash_run("triton")), ("sdpa_cudnn", sdpa_run)):
            try:
                o = run()
                grads = lambda o=o: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)  # noqa: E731
                grads()
                bwd_ms = triton.testing.do_bench(grads, warmup=25, rep=100)
                fb = lambda run=run: torch.autograd.grad(run(), (q, k, v), do)  # noqa: E731
                fb_ms = triton.testing.do_bench(fb, warmup=25, rep=100)
                row[name] = {
                    "bwd_ms": bwd_ms,
                    "bwd_tflops": 2.5 * fwd_flops / bwd_ms * 1e-9,
                    "fwd_bwd_ms": fb_ms,
                    "fwd_bwd_tflops": 3.5 * fwd_flops / fb_ms * 1e-9,
                }
            except Exception as error:
                row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        rows.append(row)
        parts = []
        for name in ("cuda", "triton", "sdpa_cudnn"):
            r = row[name]
            parts.append(
                f"{name} bwd {r['bwd_tflops']:.0f} f+b {r['fwd_bwd_tflops']:.0f}"
                if "bwd_tflops" in r
                else f"{name} ERR"
            )
        log(f"bench d{d} s{seqlen} {'causal' if causal else 'full'}: " + " | ".join(parts))
        for name in ("cuda", "triton", "sdpa_cudnn"):
            if "error" in row[name]:
                log(f"   {name}: {row[name]['error']}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    try:
        import cupy

        meta["cupy"] = cupy.__version__
    except ImportError:
        pass
    with open(os.path.join(OUT, "bwd_bench.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows, "kernel_ab": ab, "varlen": varlen}, fh, indent=1)
    log(json.dumps(meta))


PHASES = {"compile": phase_compile, "check": phase_check, "conformance": phase_conformance, "bench": phase_bench}
LIMITS = {"compile": 120, "check": 150, "conformance": 90, "bench": 120}  # seconds per phase


def parse_bench(text: str) -> list[tuple[int, int, bool]]:
    out = []
    for item in text.split(","):
        if not item:
            continue
        d, s, c = item.split(":")
        out.append((int(d), int(s), c == "causal"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", default="compile,check,bench")
    parser.add_argument("--bench", default="128:8192:full,128:8192:causal,128:4096:full,64:8192:full")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help="seconds per phase (0: the defaults)")
    args = parser.parse_args()
    args.bench_cases = parse_bench(args.bench)
    os.makedirs(OUT, exist_ok=True)
    if args.phase:
        PHASES[args.phase](args)
        return
    hung = False
    for phase in args.phases.split(","):
        if phase == "bench" and hung:
            log("== bench skipped: an earlier phase hung (the kernel would hang the bench too)")
            continue
        limit = args.limit or LIMITS[phase]
        log(f"== {phase} (limit {limit}s)")
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--bench", args.bench]
        start = time.time()
        try:
            rc = subprocess.run(cmd, check=False, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = -1  # timed out
            hung = True
        log(f"== {phase}: rc {rc} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
