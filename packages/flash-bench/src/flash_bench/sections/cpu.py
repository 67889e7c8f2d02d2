"""``cpu``: the ``reference`` backend against PyTorch's own CPU attention (time), and its peak
memory against naive attention (linear against quadratic in the sequence length); float32, batch 1.

Results JSON: ``cpu``, one row per sequence length.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import flash
from flash import timing
from flash.reference.naive import naive_attention
from flash_bench.base import Report
from flash_bench.providers import provider

DEFAULT_SEQLENS = [1024, 2048, 4096]


def measure(*, seqlens: list[int], heads: int = 8, head_dim: int = 64, causal: bool = False) -> list[dict[str, Any]]:
    """One row per length: times, time ratio, peak memories and the largest difference to SDPA."""
    cpu = torch.device("cpu")
    sdpa = provider("sdpa")
    rows = []
    print(format_row(None), flush=True)
    for seqlen in seqlens:
        gen = torch.Generator().manual_seed(seqlen)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, generator=gen) for _ in range(3))

        def ours() -> torch.Tensor:
            return flash.attention(q, k, v, causal=causal, backend="reference")

        def theirs() -> torch.Tensor:
            return sdpa(q, k, v, causal)

        def naive() -> torch.Tensor:
            return naive_attention(q, k, v, causal)

        with torch.no_grad():
            row: dict[str, Any] = {"seqlen": seqlen, "heads": heads, "head_dim": head_dim, "causal": causal}
            row["reference_ms"] = timing.measure(ours, device=cpu)
            row["sdpa_ms"] = timing.measure(theirs, device=cpu)
            row["time_ratio"] = row["reference_ms"] / row["sdpa_ms"]
            row["reference_peak_mib"] = timing.peak_mib(ours, device=cpu)
            row["naive_peak_mib"] = timing.peak_mib(naive, device=cpu)
            row["max_error_vs_sdpa"] = (ours() - theirs()).abs().max().item()
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, Any] | None) -> str:
    """One table row (the header for None)."""
    if row is None:
        titles = ("seqlen", "reference ms", "torch sdpa ms", "ratio", "reference MiB", "naive MiB")
        return " ".join(f"{title:>{width}}" for title, width in zip(titles, (7, 13, 14, 6, 14, 10)))
    return (
        f"{row['seqlen']:>7} {row['reference_ms']:>13.1f} {row['sdpa_ms']:>14.1f} {row['time_ratio']:>6.2f} "
        f"{row['reference_peak_mib']:>14.1f} {row['naive_peak_mib']:>10.1f}"
    )


class Cpu:
    name = "cpu"
    help = "the reference backend against PyTorch's CPU attention (time) and naive attention (memory)"
    devices: tuple[str, ...] = ("cpu",)
    default = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        pass  # --seqlens is shared

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        rows = measure(seqlens=options.seqlens or DEFAULT_SEQLENS)
        return Report({"cpu": rows}, "\n".join([format_row(None), *map(format_row, rows)]))


SECTION = Cpu()
