"""The main job: list the backends, run attention through auto-dispatch at a few sizes on the best
device present, check each result against the float64 oracle, and compare time and peak memory
with naive attention (which materialises the full score matrix)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import flash
from flash import cli, console, dispatch, timing
from flash.reference import dense_attention
from flash.reference.naive import naive_attention
from flash.registry import REGISTRY
from flash.testing.tolerance import bound, max_error

#: Query rows checked against the float64 oracle at large sizes (the oracle is quadratic in memory).
ORACLE_ROWS = 256
#: Columns of the results table: (title, format spec); every row is formatted the same way.
COLUMNS = (
    ("seqlen", ">7"),
    ("mask", "<6"),
    ("backend", "<10"),
    ("flash ms", ">10"),
    ("flash MiB", ">10"),
    ("naive ms", ">10"),
    ("naive MiB", ">10"),
    ("max error", ">10"),
    ("limit", ">9"),
    ("", "<6"),
)


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


def _check_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, causal: bool
) -> tuple[float, float]:
    """(error, limit) of ``out`` on the last ORACLE_ROWS query rows against the float64 oracle."""
    rows = min(ORACLE_ROWS, q.shape[1])
    q_rows = q[:, -rows:]
    # The last rows of a bottom-right causal problem are the rows of the same-shaped short problem.
    spec = flash.build_spec(q_rows, k, v, causal=causal, scale=q.shape[-1] ** -0.5)
    exact, _ = dense_attention(spec, q_rows, k, v, compute_dtype=torch.float64)
    rough, _ = dense_attention(spec, q_rows, k, v, compute_dtype=q.dtype)
    return max_error(out[:, -rows:], exact), bound(max_error(rough, exact), q.dtype)


def run(
    *, device: torch.device, seqlens: list[int], dtype: torch.dtype, heads: int, head_dim: int, backend: str = "auto"
) -> list[Result]:
    """Time, peak memory and error of ``flash.attention`` (and naive attention) at each length, full and causal."""
    results = []
    for seqlen in seqlens:
        gen = torch.Generator(device=device).manual_seed(seqlen)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
        for causal in (False, True):
            chosen = dispatch.select(flash.build_spec(q, k, v, causal=causal), "forward", backend).name

            def ours(causal: bool = causal) -> torch.Tensor:
                return flash.attention(q, k, v, causal=causal, backend=backend)

            def naive(causal: bool = causal) -> torch.Tensor:
                return naive_attention(q, k, v, causal)

            with torch.no_grad():
                error, limit = _check_rows(q, k, v, ours(), causal)
                ms = timing.measure(ours, device=device, budget_ms=50)
                peak = timing.peak_mib(ours, device=device)
                naive_ms: float | None
                naive_peak: float | None
                try:
                    naive_ms = timing.measure(naive, device=device, budget_ms=50)
                    naive_peak = timing.peak_mib(naive, device=device)
                except torch.OutOfMemoryError:
                    naive_ms = naive_peak = None
            results.append(Result(seqlen, causal, chosen, ms, peak, error, limit, naive_ms, naive_peak))
            print(format_result(results[-1]), flush=True)
    return results


def _row(cells: list[str]) -> str:
    return " ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, COLUMNS)).rstrip()


def table_header() -> str:
    """The column titles of the results table."""
    return _row([title for title, _ in COLUMNS])


def format_result(r: Result) -> str:
    """One row of the results table."""
    naive = (
        [f"{r.naive_ms:.2f}", f"{r.naive_peak_mib:.1f}"]
        if r.naive_ms is not None and r.naive_peak_mib is not None
        else ["out of", "memory"]
    )
    return _row(
        [
            str(r.seqlen),
            "causal" if r.causal else "full",
            r.backend,
            f"{r.ms:.2f}",
            f"{r.peak_mib:.1f}",
            *naive,
            f"{r.error:.2e}",
            f"{r.limit:.1e}",
            "ok" if r.ok else "FAILED",
        ]
    )


def main(options: argparse.Namespace) -> int:
    """``python -m flash [demo]``: 0 when every result is within tolerance, 1 otherwise."""
    device = options.device or cli.default_device()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    seqlens = options.seqlens or ([1024, 4096, 16384] if on_gpu else [256, 1024, 2048])
    heads, head_dim = (16, 128) if on_gpu else (8, 64)
    backend = options.backend or "auto"
    if options.backend and REGISTRY.unavailable_reasons(options.backend):
        reasons = "; ".join(REGISTRY.unavailable_reasons(options.backend))
        raise cli.UsageError(f"backend {options.backend!r} cannot run here: {reasons}")
    print(console.header(device))
    print("backends:")
    print("\n".join(console.backend_lines()))
    what = (
        f"attention, batch 1, {heads} heads, head_dim {head_dim}, {str(dtype).replace('torch.', '')}; the error is "
        f"on the last {ORACLE_ROWS} rows against the float64 oracle, its limit that of the tolerance rule:"
    )
    print("\n" + "\n".join(console.wrap(what)))
    print(table_header())
    results = run(device=device, seqlens=seqlens, dtype=dtype, heads=heads, head_dim=head_dim, backend=backend)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} results within tolerance")
    return 1 if failed else 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``demo`` with the command line."""
    parser = commands.add_parser("demo", help="the main job (the default): attention at a few sizes, checked")
    parser.description = __doc__
    parser.add_argument(
        "--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: the best present)"
    )
    parser.add_argument("--seqlens", type=cli.int_list, default=None, help="comma-separated sequence lengths")
    parser.add_argument(
        "--backend", type=cli.backend_name, default=None, help="force one backend (default: automatic dispatch)"
    )
    parser.set_defaults(run=main)
