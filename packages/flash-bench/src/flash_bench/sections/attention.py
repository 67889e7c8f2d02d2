"""``attention``: flash's GPU backends against their peers, in the same run, on the same GPU.

The FlashAttention convention (:mod:`flash.timing`): bf16, batch * seqlen = 16384, heads *
head_dim = 2048; TFLOP/s from :func:`flash.timing.attention_flops` and the median of
:func:`flash.timing.measure`. Peers: PyTorch SDPA's flash (FlashAttention-2) and cuDNN kernels
and compiled FlexAttention. Also the extra device memory of one forward against naive attention.

Results JSON: ``convention``, ``rows`` (one :class:`Row` per provider and case) and ``memory``.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import flash
from flash import cli, timing
from flash.reference.naive import naive_attention
from flash_bench.base import Report, failure, timed_line
from flash_bench.providers import KNOWN_PEERS, PEERS, Provider, provider

DEFAULT_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
MODES = ("fwd", "fwd_bwd")
#: Columns of one provider in the ratio table ("480.1 (1.40x)").
CELL = 14
#: Columns of a case in the ratio table ("fwd_bwd causal 128  16384").
CASE = 25


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
    max_error: float | None = None  # against sdpa-flash
    note: str = ""


def _case_fn(
    run: Provider, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mode: str
) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: run(q, k, v, causal)
    dout = torch.randn_like(q)

    def fwd_bwd() -> object:
        out = run(q, k, v, causal)
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd_bwd


def throughput(
    *,
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
    A provider that cannot run a case gets a row with the reason in ``note``.
    """
    device = torch.device("cuda")
    rows = []
    runs = {name: provider(name) for name in providers}
    for head_dim in head_dims:
        for seqlen in seqlens:
            batch, heads = timing.convention_shape(seqlen=seqlen, head_dim=head_dim)
            shape = (batch, seqlen, heads, head_dim)
            gen = torch.Generator(device=device).manual_seed(seqlen * head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
            for causal in causals:
                with torch.no_grad():
                    reference = provider("sdpa-flash")(q, k, v, causal).float()
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
                                row.ms = timing.measure(_case_fn(run, q, k, v, causal, mode), device=device)
                            flops = timing.attention_flops(
                                batch=batch, heads=heads, seqlen_q=seqlen, seqlen_k=seqlen, head_dim=head_dim,
                                causal=causal, mode=mode,  # type: ignore[arg-type]
                            )  # fmt: skip
                            row.tflops = timing.tflops(flops, row.ms)
                        except Exception as error:  # a peer that cannot run a case is recorded, not fatal
                            row.note = failure(error)
                        rows.append(row)
                        print(format_row(row), flush=True)
            del q, k, v
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def memory(*, providers: list[str], seqlens: list[int], heads: int = 16, head_dim: int = 128) -> list[dict[str, Any]]:
    """Extra device memory of one forward (batch 1) per provider, against naive attention."""
    device = torch.device("cuda")
    runs: dict[str, Provider] = {name: provider(name) for name in providers}
    runs["naive"] = naive_attention
    out: list[dict[str, Any]] = []
    for seqlen in seqlens:
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        for name, run in runs.items():
            try:
                with torch.no_grad():
                    extra = timing.peak_mib(lambda: run(q, k, v, False), device=device)
                out.append({"provider": name, "seqlen": seqlen, "extra_mib": round(extra, 2)})
            except torch.OutOfMemoryError:
                out.append({"provider": name, "seqlen": seqlen, "extra_mib": None, "note": "out of memory"})
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- reporting


def format_row(row: Row) -> str:
    """One progress line."""
    mask = "causal" if row.causal else "full"
    what = f"{row.provider:<11} {row.mode:<7} {mask:<6} d={row.head_dim:<3} s={row.seqlen:<6}"
    return timed_line(what, row.ms, row.tflops, row.max_error, row.note)


def ratio_table(rows: list[Row], baseline: str = "sdpa-flash") -> str:
    """TFLOP/s of every provider per case and its ratio to ``baseline``; providers in groups that fit
    100 columns."""
    cases: dict[tuple[str, bool, int, int], dict[str, Row]] = {}
    for row in rows:
        cases.setdefault((row.mode, row.causal, row.head_dim, row.seqlen), {})[row.provider] = row
    providers = sorted({r.provider for r in rows}, key=lambda p: (p in PEERS, p))
    per_table = max(1, (100 - CASE) // (CELL + 1))
    tables = []
    for start in range(0, len(providers), per_table):
        group = providers[start : start + per_table]
        lines = [f"{'mode':<7} {'mask':<6} {'d':>3} {'seqlen':>6}" + "".join(f" {p:>{CELL}}" for p in group)]
        for (mode, causal, head_dim, seqlen), by in sorted(cases.items()):
            base = by.get(baseline)
            cells = []
            for p in group:
                r = by.get(p)
                if r is None or r.tflops is None:
                    cells.append(f" {'-':>{CELL}}")
                    continue
                ratio = f"({r.tflops / base.tflops:.2f}x)" if base and base.tflops else ""
                cells.append(f" {r.tflops:6.1f} {ratio:>7}")
            mask = "causal" if causal else "full"
            lines.append(f"{mode:<7} {mask:<6} {head_dim:>3} {seqlen:>6}" + "".join(cells))
        tables.append("\n".join(lines))
    return f"TFLOP/s (ratio to {baseline}):\n" + "\n\n".join(tables)


# ----------------------------------------------------------------------------- the section


class Attention:
    name = "attention"
    help = "TFLOP/s of the GPU backends and their peers, and memory against naive attention (GPU)"
    devices: tuple[str, ...] = ("cuda",)
    default = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--peers",
            type=cli.choice_list(KNOWN_PEERS, "peer"),
            default=list(PEERS),
            help="peers to time in the same run",
        )
        group.add_argument(
            "--flex-seqlens", type=cli.int_list, default=None, help="time FlexAttention only at these lengths"
        )
        group.add_argument("--head-dims", type=cli.int_list, default=[64, 128], help="default: 64,128")
        group.add_argument(
            "--causal", choices=("both", "yes", "no"), default="both", help="masks to time (default: both)"
        )
        group.add_argument(
            "--modes", type=cli.choice_list(MODES, "mode"), default=list(MODES), help="fwd, fwd_bwd or both"
        )
        group.add_argument(
            "--memory-seqlens", type=cli.int_list, default=[1024, 4096, 16384], help="lengths of the memory comparison"
        )

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        names = options.backends or [b.name for b in flash.backends() if b.usable and b.name != "reference"]
        providers = names + options.peers
        rows = throughput(
            providers=providers,
            seqlens=options.seqlens or DEFAULT_SEQLENS,
            head_dims=options.head_dims,
            causals={"both": [False, True], "yes": [True], "no": [False]}[options.causal],
            modes=options.modes,
            flex_seqlens=options.flex_seqlens,
        )
        # FlexAttention is left out of the memory comparison: it would compile again for every length.
        used = memory(providers=[p for p in providers if p != "flex"], seqlens=options.memory_seqlens)
        convention = {
            "tokens": timing.TOKENS,
            "model_dim": timing.MODEL_DIM,
            "dtype": "bf16",
            "fwd_bwd_factor": timing.MODE_FACTORS["fwd_bwd"],
        }
        results = {"convention": convention, "rows": [asdict(r) for r in rows], "memory": used}
        return Report(results, ratio_table(rows))


SECTION = Attention()
