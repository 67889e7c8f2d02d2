"""Time flash-triton kernel configurations on this GPU, next to SDPA measured in the same process.

For each head dim and mask it times every candidate forward and backward configuration at the
benchmark convention's shape (batch * seqlen = 16384, heads * head_dim = 2048, bf16), checks each
result against SDPA's flash backend, and prints a table sorted by speed; ``--out`` saves JSON.
Timer, FLOP convention and environment record are :mod:`flash.timing`'s, the SDPA peers
``flash-bench``'s (install it too).
Compilation happens first, in parallel worker processes (the kernels land in Triton's on-disk
cache), so the timing loop only loads them.

    python packages/flash-triton/scripts/tune.py --head-dims 64,128 --out tune.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent import futures
from typing import Any

os.environ["FLASH_TRITON_NO_FALLBACK"] = "1"  # time exactly the configuration named

import torch

from flash import timing

TOKENS, MODEL_DIM = timing.TOKENS, timing.MODEL_DIM
DEVICE = "cuda"


def _cfg(block_m, block_n, warps, stages, **extra):
    return {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages, **extra}


def _bwd(block_m, block_n, warps, stages, dq=(128, 64, 8, 3), **extra):
    dq_m, dq_n, dq_w, dq_s = dq
    return _cfg(block_m, block_n, warps, stages, dq_block_m=dq_m, dq_block_n=dq_n, dq_num_warps=dq_w,
                dq_num_stages=dq_s, **extra)  # fmt: skip


FORWARD = {
    128: [
        _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 3, tma=True), _cfg(128, 64, 8, 2, tma=True),
        _cfg(128, 64, 8, 4, tma=True), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 2, tma=True),
        _cfg(64, 64, 4, 2), _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 2, tma=True), _cfg(64, 64, 4, 3, tma=True),
        _cfg(128, 32, 8, 4, tma=True),
    ],
    64: [
        _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 3, tma=True), _cfg(128, 128, 8, 2, tma=True),
        _cfg(128, 64, 4, 3), _cfg(128, 64, 4, 3, tma=True), _cfg(128, 64, 8, 3, tma=True),
        _cfg(64, 128, 4, 3), _cfg(64, 128, 4, 3, tma=True), _cfg(64, 64, 4, 3, tma=True),
    ],
}  # fmt: skip
BACKWARD = {
    128: [
        _bwd(64, 128, 8, 3), _bwd(64, 128, 8, 2), _bwd(32, 128, 8, 3), _bwd(32, 128, 8, 2),
        _bwd(64, 64, 4, 3), _bwd(32, 64, 4, 3), _bwd(64, 128, 8, 3, tma=True), _bwd(32, 128, 8, 3, tma=True),
        _bwd(32, 128, 8, 3, dq=(128, 32, 8, 3)), _bwd(32, 128, 8, 3, dq=(64, 64, 4, 3)),
        _bwd(32, 128, 8, 3, dq=(128, 64, 8, 2)), _bwd(32, 128, 8, 3, dq=(64, 128, 8, 2)),
    ],
    64: [
        _bwd(64, 128, 8, 3, dq=(128, 64, 8, 3)), _bwd(64, 128, 8, 2, dq=(128, 64, 8, 3)),
        _bwd(32, 128, 8, 3, dq=(128, 64, 8, 3)), _bwd(64, 64, 4, 3, dq=(64, 64, 4, 3)),
        _bwd(128, 128, 8, 2, dq=(128, 128, 8, 2)), _bwd(64, 128, 8, 3, dq=(128, 64, 8, 3), tma=True),
        _bwd(64, 128, 8, 3, dq=(128, 128, 8, 2)), _bwd(64, 128, 8, 3, dq=(64, 64, 4, 3)),
    ],
}  # fmt: skip


#: Second round (after the first GPU run fixed the table): neighbours of the winners, and repeats of
#: the winners to see the run-to-run spread.
ROUND2_FORWARD = {
    128: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 8, 3, tma=True)],
    64: [_cfg(128, 64, 8, 3, tma=True), _cfg(128, 64, 4, 3, tma=True)],
}  # fmt: skip
ROUND2_BACKWARD = {
    128: [
        _bwd(64, 128, 8, 3), _bwd(64, 128, 8, 3, dq_tma=True), _bwd(64, 128, 8, 3, dq=(128, 64, 8, 4)),
        _bwd(64, 128, 8, 4), _bwd(32, 64, 4, 3), _bwd(64, 64, 8, 3),
    ],
    64: [_bwd(64, 128, 8, 3, tma=True), _bwd(64, 128, 8, 3, dq=(128, 64, 8, 4), tma=True)],
}  # fmt: skip
SETS = {"round1": (FORWARD, BACKWARD), "round2": (ROUND2_FORWARD, ROUND2_BACKWARD)}


class Problem:
    """One benchmark-convention problem with preallocated outputs (canonical bshd, contiguous)."""

    def __init__(self, head_dim: int, causal: bool, seqlen: int):
        device = DEVICE
        from flash.backend import BackwardArgs, ForwardArgs
        from flash.spec import build_spec

        self.head_dim, self.causal, self.seqlen = head_dim, causal, seqlen
        batch, heads = timing.convention_shape(seqlen=seqlen, head_dim=head_dim, tokens=TOKENS, model_dim=MODEL_DIM)
        gen = torch.Generator(device=device).manual_seed(seqlen * head_dim + causal)
        shape = (batch, seqlen, heads, head_dim)
        self.q, self.k, self.v, self.dout = (
            torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4)
        )
        self.spec = build_spec(self.q, self.k, self.v, causal=causal)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(self.spec.lse_shape(), device=device, dtype=torch.float32)
        self.fwd_args = ForwardArgs(self.q, self.k, self.v, self.out, self.lse)
        self.grads = [torch.empty_like(t) for t in (self.q, self.k, self.v)]
        self.bwd_args = BackwardArgs(self.q, self.k, self.v, self.out, self.lse, self.dout, *self.grads)
        dims = {"batch": batch, "heads": heads, "seqlen_q": seqlen, "seqlen_k": seqlen, "head_dim": head_dim}
        self.flops = {mode: timing.attention_flops(**dims, causal=causal, mode=mode) for mode in ("fwd", "bwd")}


def _config(data: dict):
    from flash.heuristics import KernelConfig

    return KernelConfig.from_json(data)


def run_forward(p: Problem, cfg: dict) -> None:
    from flash_triton import launch

    launch.forward(p.spec, p.fwd_args, _config(cfg))


def run_backward(p: Problem, cfg: dict) -> None:
    from flash_triton import launch

    launch.backward(p.spec, p.bwd_args, _config(cfg))


def _compile_job(job: tuple) -> tuple:
    """Worker: compile one (pass, head_dim, causal, config) on a small problem of the same specialisation."""
    pass_, head_dim, causal, cfg, (device, tokens, model_dim), first_forward = job
    global DEVICE, TOKENS, MODEL_DIM
    DEVICE, TOKENS, MODEL_DIM = device, tokens, model_dim
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    try:
        p = Problem(head_dim, causal, seqlen=256)
        run_forward(p, first_forward)  # a valid out/lse for the backward
        (run_forward if pass_ == "forward" else run_backward)(p, cfg)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return job, None, time.perf_counter() - t0
    except Exception as error:
        return job, f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}", 0.0


def compile_all(jobs: list[tuple], workers: int) -> dict:
    failures = {}
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for job, error, _ in pool.map(_compile_job, jobs):
            if error:
                failures[json.dumps(job, sort_keys=True, default=list)] = error
                print(f"compile FAILED {job}: {error}", flush=True)
    print(f"compiled {len(jobs)} jobs in {time.perf_counter() - t0:.0f}s with {workers} workers", flush=True)
    return failures


def _bench(fn) -> float:
    if DEVICE != "cuda":  # --dry-run: one timed call, to exercise this script without a GPU
        return timing.per_call_us(fn, device=DEVICE, calls=1, warmup=0) / 1e3
    return timing.measure(fn, device=DEVICE, budget_ms=150)


def _sdpa(kind: str):
    from flash_bench.providers import provider

    return provider(f"sdpa-{kind}")


def peers(p: Problem) -> tuple[dict, dict]:
    """SDPA flash/cuDNN forward and forward+backward times, and SDPA flash's output and grads."""
    rows: dict[str, dict[str, float | str]] = {}
    q, k, v = (t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v))
    ref = {}
    for kind in ("flash", "cudnn"):
        run = _sdpa(kind)
        try:
            with torch.no_grad():
                fwd = _bench(lambda: run(p.q, p.k, p.v, p.causal))

            def fwd_bwd():
                out = run(q, k, v, p.causal)
                return torch.autograd.grad(out, (q, k, v), p.dout)

            both = _bench(fwd_bwd)
            rows[kind] = {"fwd_ms": fwd, "fwd_bwd_ms": both}
            if kind == "flash":
                out = run(q, k, v, p.causal)
                ref["out"] = out.detach().float()
                ref["grads"] = [g.float() for g in torch.autograd.grad(out, (q, k, v), p.dout)]
        except Exception as error:
            rows[kind] = {"error": f"{type(error).__name__}: {error}"[:200]}
    return rows, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def tune_case(head_dim: int, causal: bool, seqlen: int, failures: dict, passes: list[str], tables) -> dict:
    p = Problem(head_dim, causal, seqlen)
    peer, ref = peers(p)
    forward_table, backward_table = tables
    result: dict[str, Any] = {"head_dim": head_dim, "causal": causal, "seqlen": seqlen, "peers": peer}
    result.update(forward=[], backward=[])
    for pass_ in passes:
        table = forward_table if pass_ == "forward" else backward_table
        for cfg in table[head_dim]:
            where = [DEVICE, TOKENS, MODEL_DIM]
            job = json.dumps((pass_, head_dim, causal, cfg, where, forward_table[head_dim][0]), sort_keys=True)
            row = {"config": cfg}
            if job in failures:
                row["error"] = failures[job]
                result[pass_].append(row)
                continue
            try:
                if pass_ == "forward":
                    run_forward(p, cfg)
                    row["err_vs_sdpa_flash"] = _rel(p.out, ref["out"]) if ref else None
                    row["ms"] = _bench(lambda: run_forward(p, cfg))
                    row["tflops"] = timing.tflops(p.flops["fwd"], row["ms"])
                else:
                    run_forward(p, forward_table[head_dim][0])
                    run_backward(p, cfg)
                    if ref:
                        row["err_vs_sdpa_flash"] = max(_rel(g, r) for g, r in zip(p.grads, ref["grads"]))
                    row["ms"] = _bench(lambda: run_backward(p, cfg))
                    row["tflops"] = timing.tflops(p.flops["bwd"], row["ms"])
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
                traceback.print_exc()
            result[pass_].append(row)
            print(_fmt(head_dim, causal, pass_, row), flush=True)
    return result


def profile_case(head_dim: int, causal: bool, seqlen: int) -> dict:
    """Per-kernel GPU time of the table's configuration (forward, then backward), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from flash import heuristics
    from flash_triton.backend import TritonBackend

    p = Problem(head_dim, causal, seqlen)
    backend = TritonBackend()
    fwd, bwd = (heuristics.config_for(backend, p.spec, x).to_json() for x in ("forward", "backward"))
    run_forward(p, fwd)
    run_backward(p, bwd)
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run_forward(p, fwd)
            run_backward(p, bwd)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total and "kernel" in event.key:
            times[event.key] = total / reps / 1e3  # ms per call
    line = ", ".join(f"{k.replace('attention_', '').replace('_kernel', '')} {v:.3f} ms" for k, v in times.items())
    print(f"profile d{head_dim} {'causal' if causal else 'full'} s{seqlen}: {line}", flush=True)
    return times


def _fmt(head_dim, causal, pass_, row) -> str:
    what = f"d{head_dim:<3} {'causal' if causal else 'full':<6} {pass_:<8} {json.dumps(row['config'], sort_keys=True)}"
    if "error" in row:
        return f"{what}  ERROR {row['error']}"
    return f"{what}  {row['ms']:.3f} ms {row['tflops']:.1f} TFLOP/s err {row.get('err_vs_sdpa_flash') or 0:.1e}"


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        peer = r["peers"]
        fl, cu = peer.get("flash", {}), peer.get("cudnn", {})
        head = f"d={r['head_dim']} {'causal' if r['causal'] else 'full'} s={r['seqlen']}"
        fl_f = fl.get("fwd_ms")
        fl_b = fl.get("fwd_bwd_ms")
        lines.append(f"== {head}: sdpa-flash fwd {fl_f} ms fwd+bwd {fl_b} ms | cudnn fwd {cu.get('fwd_ms')} "
                     f"fwd+bwd {cu.get('fwd_bwd_ms')}")  # fmt: skip
        for pass_ in ("forward", "backward"):
            ok = sorted((x for x in r[pass_] if "ms" in x), key=lambda x: x["ms"])
            for x in ok[:4]:
                ratio = ""
                if pass_ == "forward" and fl_f:
                    ratio = f"{fl_f / x['ms']:.2f}x sdpa-flash fwd"
                elif pass_ == "backward" and fl_f and fl_b and r[pass_] and r["forward"]:
                    best_f = min((y["ms"] for y in r["forward"] if "ms" in y), default=None)
                    if best_f:
                        ratio = f"fwd+bwd {best_f + x['ms']:.3f} ms = {fl_b / (best_f + x['ms']):.2f}x sdpa-flash"
                lines.append(
                    f"   {pass_:<8} {x['ms']:.3f} ms {x['tflops']:6.1f} TFLOP/s {ratio}  "
                    f"{json.dumps(x['config'], sort_keys=True)} err {x.get('err_vs_sdpa_flash') or 0:.1e}"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--passes", default="forward,backward")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 4))
    parser.add_argument("--out", default="tune.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: test the script")
    parser.add_argument("--set", choices=sorted(SETS), default="round1", help="which candidate configurations")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel times of the table's configs")
    args = parser.parse_args(argv)
    if args.dry_run:
        global TOKENS, MODEL_DIM, DEVICE
        os.environ["TRITON_INTERPRET"] = "1"
        TOKENS, MODEL_DIM, DEVICE = args.seqlen, 0, "cpu"
    dims = [int(x) for x in args.head_dims.split(",")]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    passes = args.passes.split(",")
    where = (DEVICE, TOKENS, MODEL_DIM)
    tables = SETS[args.set]
    jobs = [(pass_, d, c, cfg, where, tables[0][d][0]) for d in dims for c in causals for pass_ in passes
            for cfg in tables[0 if pass_ == "forward" else 1][d]]  # fmt: skip
    failures = compile_all(jobs, args.workers) if args.workers > 0 else {}
    results = []
    for d in dims:
        for c in causals:
            if args.profile and DEVICE == "cuda":
                try:
                    profile_case(d, c, args.seqlen)
                except Exception as error:  # the profile is a bonus; the sweep goes on
                    print(f"profile failed: {type(error).__name__}: {error}", flush=True)
            results.append(tune_case(d, c, args.seqlen, failures, passes, tables))
            with open(args.out, "w") as fh:
                json.dump({"environment": timing.environment(), "results": results}, fh, indent=1)
    print("\n" + summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
