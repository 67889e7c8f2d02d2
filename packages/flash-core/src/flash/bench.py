"""Benchmarks: flash backends against their peers, measured in the same run.

GPU (the FlashAttention convention, ``GPU-BASELINES.md``): batch * seqlen = 16384,
heads * head_dim = 2048, forward FLOPs = 4 * batch * heads * seqlen^2 * head_dim
(halved when causal), forward+backward = 3.5x forward. Peers: torch SDPA's
flash (FlashAttention-2) and cuDNN backends and compiled FlexAttention. Times are
medians of ``triton.testing.do_bench`` (CUDA events).

CPU: the reference backend against torch's own CPU ``scaled_dot_product_attention``
(time), and peak memory against naive attention (memory linear vs quadratic in seqlen).

Results are JSON (with GPU, date and versions) plus a printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

import flash

TOKENS = 16384
MODEL_DIM = 2048
PEERS = ("sdpa-flash", "sdpa-cudnn", "flex")


@dataclass
class Row:
    provider: str
    mode: str  # "fwd" or "fwd_bwd"
    causal: bool
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    ms: float | None
    tflops: float | None
    max_error: float | None = None  # against sdpa-flash (or the float32 math result on the CPU)
    note: str = ""


def flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str) -> float:
    """Floating-point operations of one case, by the FlashAttention convention."""
    forward = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """GPU, date and versions: what every committed result must carry."""
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        major, minor = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{major}{minor}"
    for dist in ("flash-core", "flash-triton", "flash-cuda", "triton", "cupy-cuda13x", "cupy-cuda12x"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    return info


# ----------------------------------------------------------------------------- providers


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Textbook attention in the inputs' precision: the full score matrix in memory."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _sdpa(kind: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def run(q, k, v, causal):  # q: (b, s, h, d) contiguous; SDPA takes the (b, h, s, d) view
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    return run


def _flex() -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple, object] = {}

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v, causal):
        block_mask = None
        if causal:
            key = (q.shape[1], k.shape[1])
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, None, None, q.shape[1], k.shape[1], device=q.device)
            block_mask = masks[key]
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def _flash(backend: str) -> Callable:
    def run(q, k, v, causal):
        return flash.attention(q, k, v, causal=causal, backend=backend)

    return run


def provider(name: str) -> Callable:
    """A callable ``(q, k, v, causal) -> out`` for a flash backend or a peer."""
    if name in ("sdpa-flash", "sdpa-cudnn"):
        return _sdpa(name)
    if name == "flex":
        return _flex()
    return _flash(name)


# ----------------------------------------------------------------------------- timing


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _case_fn(run: Callable, q, k, v, causal: bool, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: run(q, k, v, causal)
    dout = torch.randn_like(q)

    def fwd_bwd():
        out = run(q, k, v, causal)
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd_bwd


def gpu_benchmark(
    providers: list[str],
    seqlens: list[int],
    head_dims: list[int],
    causals: list[bool],
    modes: list[str],
    dtype: torch.dtype = torch.bfloat16,
    flex_seqlens: list[int] | None = None,
) -> list[Row]:
    """Time every provider on every case of the convention; one :class:`Row` each.

    FlexAttention compiles anew for every shape; ``flex_seqlens`` limits it to some lengths.
    """
    device = torch.device("cuda")
    rows = []
    runs = {name: provider(name) for name in providers}
    for head_dim in head_dims:
        heads = MODEL_DIM // head_dim
        for seqlen in seqlens:
            batch = max(1, TOKENS // seqlen)
            shape = (batch, seqlen, heads, head_dim)
            gen = torch.Generator(device=device).manual_seed(seqlen * head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
            for causal in causals:
                reference = _sdpa("sdpa-flash")(q, k, v, causal).float()
                for mode in modes:
                    for t in (q, k, v):
                        t.requires_grad_(mode == "fwd_bwd")
                    for name, run in runs.items():
                        if name == "flex" and flex_seqlens is not None and seqlen not in flex_seqlens:
                            continue
                        row = Row(name, mode, causal, head_dim, seqlen, batch, heads, None, None)
                        try:
                            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                                if mode == "fwd":
                                    row.max_error = (run(q, k, v, causal).float() - reference).abs().max().item()
                                row.ms = _median_ms(_case_fn(run, q, k, v, causal, mode), device)
                            row.tflops = flops(batch, heads, seqlen, head_dim, causal, mode) / row.ms / 1e9
                        except Exception as error:  # a peer that cannot run a case is recorded, not fatal
                            row.note = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                        rows.append(row)
                        print(_format_row(row), flush=True)
            del q, k, v
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def gpu_memory(providers: list[str], seqlens: list[int], heads: int = 16, head_dim: int = 128) -> list[dict]:
    """Extra device memory of one forward (batch 1) per provider, against naive attention."""
    device = torch.device("cuda")
    runs = {name: provider(name) for name in providers}

    runs["naive"] = naive_attention
    out = []
    for seqlen in seqlens:
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        for name, run in runs.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                with torch.no_grad():
                    run(q, k, v, False)
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                out.append({"provider": name, "seqlen": seqlen, "extra_mib": round(extra, 2)})
            except torch.OutOfMemoryError:
                out.append({"provider": name, "seqlen": seqlen, "extra_mib": None, "note": "out of memory"})
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- CPU


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide the profiler's native start/stop log lines (written by C++ straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak extra host memory of ``fn`` in MiB, from the profiler's allocation records.

    Every CPU allocation and free is a timestamped ``[memory]`` record; their running sum in time
    order is the live-memory curve, whose maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    level = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        level += record.nbytes()
        peak = max(peak, level)
    return peak / 2**20


def cpu_benchmark(seqlens: list[int], heads: int = 8, head_dim: int = 64, causal: bool = False) -> list[dict]:
    """Reference backend vs torch's CPU SDPA (time) and naive attention (memory), float32, batch 1."""
    rows = []
    for seqlen in seqlens:
        gen = torch.Generator().manual_seed(seqlen)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, generator=gen) for _ in range(3))

        def ours():
            return flash.attention(q, k, v, causal=causal, backend="reference")

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            ).transpose(1, 2)

        def naive():
            return naive_attention(q, k, v, causal)

        with torch.no_grad():
            row = {"seqlen": seqlen, "heads": heads, "head_dim": head_dim, "causal": causal}
            row["reference_ms"] = _median_ms(ours, q.device)
            row["sdpa_ms"] = _median_ms(sdpa, q.device)
            row["time_ratio"] = row["reference_ms"] / row["sdpa_ms"]
            row["reference_peak_mib"] = cpu_peak_mib(ours)
            row["naive_peak_mib"] = cpu_peak_mib(naive)
            row["max_error_vs_sdpa"] = (ours() - sdpa()).abs().max().item()
        rows.append(row)
        print(
            f"seqlen {seqlen:6d}  reference {row['reference_ms']:9.1f} ms  torch sdpa {row['sdpa_ms']:9.1f} ms  "
            f"ratio {row['time_ratio']:.2f}  peak MiB reference {row['reference_peak_mib']:8.1f}  "
            f"naive {row['naive_peak_mib']:8.1f}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- reporting


def _format_row(row: Row) -> str:
    mask = "causal" if row.causal else "full"
    what = f"{row.provider:<11} {row.mode:<7} {mask:<6} d={row.head_dim:<3} s={row.seqlen:<6}"
    if row.ms is None:
        return f"{what} failed: {row.note}"
    return f"{what} {row.ms:8.3f} ms {row.tflops:7.1f} TFLOP/s" + (
        f"  err {row.max_error:.2e}" if row.max_error is not None else ""
    )


def ratio_table(rows: list[Row], baseline: str = "sdpa-flash") -> str:
    """One line per case: TFLOP/s of every provider and its ratio to ``baseline``."""
    cases: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        cases.setdefault((row.mode, row.causal, row.head_dim, row.seqlen), {})[row.provider] = row
    providers = sorted({r.provider for r in rows}, key=lambda p: (p in PEERS, p))
    header = f"{'mode':<7} {'mask':<6} {'d':>3} {'seqlen':>6} " + " ".join(f"{p:>18}" for p in providers)
    lines = [header]
    for (mode, causal, head_dim, seqlen), by in sorted(cases.items()):
        base = by.get(baseline)
        cells = []
        for p in providers:
            r = by.get(p)
            if r is None or r.tflops is None:
                cells.append(f"{'-':>18}")
                continue
            ratio = f"({r.tflops / base.tflops:.2f}x)" if base and base.tflops else ""
            cells.append(f"{r.tflops:>10.1f} {ratio:>7}")
        lines.append(f"{mode:<7} {'causal' if causal else 'full':<6} {head_dim:>3} {seqlen:>6} " + " ".join(cells))
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    """``python -m flash bench``."""
    parser = argparse.ArgumentParser(prog="python -m flash bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="flash backends to time (default: every usable kernel one)")
    parser.add_argument("--peers", default=",".join(PEERS), help="peers to time in the same run")
    parser.add_argument(
        "--flex-seqlens", default=None, help="time FlexAttention only at these lengths (it compiles per shape)"
    )
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--memory-seqlens", default="1024,4096,16384")
    parser.add_argument("--cpu", action="store_true", help="run the CPU benchmark even if a GPU is present")
    parser.add_argument("--out", default="flash-bench.json", help="where to write the JSON results")
    args = parser.parse_args(argv)

    result: dict[str, object] = {"environment": environment()}
    if torch.cuda.is_available() and not args.cpu:
        names = (
            args.backends.split(",")
            if args.backends
            else [b.name for b in flash.backends() if b.usable and b.name != "reference"]
        )
        providers = names + [p for p in args.peers.split(",") if p]
        causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
        flex_seqlens = _ints(args.flex_seqlens) if args.flex_seqlens else None
        rows = gpu_benchmark(
            providers,
            _ints(args.seqlens),
            _ints(args.head_dims),
            causals,
            args.modes.split(","),
            flex_seqlens=flex_seqlens,
        )
        result["convention"] = {"tokens": TOKENS, "model_dim": MODEL_DIM, "dtype": "bf16", "fwd_bwd_factor": 3.5}
        result["rows"] = [asdict(r) for r in rows]
        # FlexAttention is left out of the memory comparison: it would compile again for every length.
        result["memory"] = gpu_memory([p for p in providers if p != "flex"], _ints(args.memory_seqlens))
        table = ratio_table(rows)
    else:
        cpu_rows = cpu_benchmark(
            _ints(args.seqlens) if args.seqlens != parser.get_default("seqlens") else [1024, 2048, 4096]
        )
        result["cpu"] = cpu_rows
        table = "\n".join(
            f"seqlen {r['seqlen']}: reference/sdpa time ratio {r['time_ratio']:.2f}, "
            f"peak MiB {r['reference_peak_mib']:.1f} vs naive {r['naive_peak_mib']:.1f}"
            for r in cpu_rows
        )
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nresults: {args.out}\n{table}")
    return 0
