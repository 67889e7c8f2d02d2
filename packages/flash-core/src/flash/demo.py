"""The main job: list the backends, run attention through auto-dispatch at a few sizes on the best
device present, check each result against the float64 oracle, and compare time and peak memory
with naive attention (which materialises the full score matrix)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import flash
from flash import dispatch
from flash.bench import cpu_peak_mib, naive_attention
from flash.reference import dense_attention
from flash.testing.tolerance import bound, max_error

#: Query rows checked against the float64 oracle at large sizes (the oracle is quadratic in memory).
ORACLE_ROWS = 256


@dataclass
class Result:
    seqlen: int
    causal: bool
    backend: str
    ms: float
    peak_mib: float
    error: float
    limit: float
    naive_ms: float | None
    naive_peak_mib: float | None

    @property
    def ok(self) -> bool:
        return self.error <= self.limit


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel compilation and caches stay out of the numbers
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return cpu_peak_mib(fn)


def _check_rows(q, k, v, out, causal: bool) -> tuple[float, float]:
    """(error, limit) of ``out`` on the last ORACLE_ROWS query rows against the float64 oracle."""
    rows = min(ORACLE_ROWS, q.shape[1])
    q_rows = q[:, -rows:]
    # The last rows of a bottom-right causal problem are the rows of the same-shaped short problem.
    spec = flash.build_spec(q_rows, k, v, causal=causal, scale=q.shape[-1] ** -0.5)
    exact, _ = dense_attention(spec, q_rows, k, v, compute_dtype=torch.float64)
    rough, _ = dense_attention(spec, q_rows, k, v, compute_dtype=q.dtype)
    return max_error(out[:, -rows:], exact), bound(max_error(rough, exact), q.dtype)


def run(device: torch.device, seqlens: list[int], dtype: torch.dtype, heads: int, head_dim: int) -> list[Result]:
    results = []
    repeats = 10 if device.type == "cuda" else 3
    for seqlen in seqlens:
        gen = torch.Generator(device=device).manual_seed(seqlen)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
        for causal in (False, True):
            spec = flash.build_spec(q, k, v, causal=causal)
            backend = dispatch.select(spec, "forward").name
            with torch.no_grad():
                out = flash.attention(q, k, v, causal=causal)
                error, limit = _check_rows(q, k, v, out, causal)
                ms = _time_ms(lambda: flash.attention(q, k, v, causal=causal), device, repeats)
                peak = _peak_mib(lambda: flash.attention(q, k, v, causal=causal), device)
                try:
                    naive_ms = _time_ms(lambda: naive_attention(q, k, v, causal), device, repeats)
                    naive_peak = _peak_mib(lambda: naive_attention(q, k, v, causal), device)
                except torch.OutOfMemoryError:
                    naive_ms = naive_peak = None
            results.append(Result(seqlen, causal, backend, ms, peak, error, limit, naive_ms, naive_peak))
            print(_format(results[-1]), flush=True)
    return results


def _format(r: Result) -> str:
    naive = (
        f"naive {r.naive_ms:9.2f} ms {r.naive_peak_mib:9.1f} MiB"
        if r.naive_ms is not None and r.naive_peak_mib is not None
        else "naive: out of memory"
    )
    verdict = "ok" if r.ok else "FAILED"
    return (
        f"seqlen {r.seqlen:6d} {'causal' if r.causal else 'full  '} via {r.backend:<9} "
        f"{r.ms:9.2f} ms {r.peak_mib:9.1f} MiB | {naive} | "
        f"max error {r.error:.2e} (limit {r.limit:.2e}) {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best present)")
    parser.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    default_seqlens = "1024,4096,16384" if on_gpu else "256,1024,2048"
    seqlens = [int(s) for s in (args.seqlens or default_seqlens).split(",")]
    heads, head_dim = (16, 128) if on_gpu else (8, 64)

    print(
        f"flash {flash.__version__} | torch {torch.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else "")
    )
    print("backends:")
    for info in flash.backends():
        print(f"  {info}")
    print(
        f"\nattention, batch 1, {heads} heads, head_dim {head_dim}, {str(dtype).replace('torch.', '')}, "
        f"errors on the last {ORACLE_ROWS} rows against the float64 oracle:"
    )
    results = run(device, seqlens, dtype, heads, head_dim)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} results within tolerance")
    return 1 if failed else 0
