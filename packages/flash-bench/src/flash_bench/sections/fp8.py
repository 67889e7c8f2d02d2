"""``fp8``: each flash backend's fp8 forward against its own bf16 forward and cuDNN's bf16, same GPU, same run.

The FlashAttention convention (:mod:`flash.timing`): batch * seqlen = 16384, heads * head_dim =
2048, forward only (fp8 attention has no backward), TFLOP/s from :func:`flash.timing.attention_flops`
and the median of :func:`flash.timing.measure`. For every case the bf16 inputs (N(0, 1)) are
quantised to float8_e4m3fn with one descale factor per (batch, head) (:func:`flash.fp8.quantize_qkv`);
each backend runs the fp8 call and the bf16 call on the same inputs, forced with ``backend=``, and
PyTorch SDPA's cuDNN kernel the bf16 call (the fastest bf16 peer on Hopper).

Every output is compared with a float64 oracle (the reference backend in float64) on the inputs
*that call received*: the dequantised fp8 values for fp8 calls, the bf16 values for bf16 calls, so
``max_error`` is the kernel's own error, not the quantisation's.

The backends timed by default are those whose forward accepts an fp8 problem on this GPU (asked
through :func:`flash.explain`, so a backend that declares fp8 later is timed without a change here).
Not a default section: it times three calls and computes two float64 oracles for each of 30 cases.

    python -m flash bench --sections fp8 --out fp8.json

Results JSON: ``fp8`` with ``convention`` and ``rows`` (one :class:`Row` per provider, dtype and case).
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
from flash_bench.base import Report, failure, timed_line
from flash_bench.providers import provider

DEFAULT_SEQLENS = [1024, 2048, 4096, 8192, 16384]
DEFAULT_HEAD_DIMS = [64, 128, 256]
FP8 = "fp8_e4m3"
BF16 = "bf16"
#: The bf16 peer every fp8 time is compared with.
PEER = "sdpa-cudnn"
#: Columns of one backend's cell in the ratio table ("1234.5  1.45x  1.35x").
CELL = 20


@dataclass
class Row:
    provider: str  # a flash backend, or the peer
    dtype: str  # FP8 or BF16: what the call computed with
    causal: bool
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    ms: float | None
    tflops: float | None
    max_error: float | None = None  # against the float64 oracle on the inputs the call received
    note: str = ""


def fp8_backends(device: torch.device) -> list[str]:
    """Backends whose forward takes an e4m3 problem with per-head descales on ``device`` (the
    reference's only off the GPU), as :func:`flash.explain` decides it."""
    probe = flash.fp8.quantize_qkv(*(torch.ones(1, 128, 2, 128, device=device) for _ in range(3)))
    considered = flash.explain(**probe).forward.considered
    return [name for name, _, reasons in considered if not reasons and (name != "reference" or device.type != "cuda")]


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention in float64 by the reference backend (tiled: memory linear in the sequence length)."""
    return flash.attention(q.double(), k.double(), v.double(), causal=causal, backend="reference")


def dequantized(inputs: flash.fp8.QuantizedQKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 values that fp8 inputs with per-head descale factors stand for."""
    pairs = ((inputs["q"], inputs["q_descale"]), (inputs["k"], inputs["k_descale"]), (inputs["v"], inputs["v_descale"]))
    q, k, v = (t.double() * descale.double()[:, None, :, None] for t, descale in pairs)
    return q, k, v


def measure(
    *,
    backends: list[str],
    seqlens: list[int],
    head_dims: list[int],
    causals: list[bool],
    device: torch.device,
    peer: str | None = PEER,
    tokens: int = timing.TOKENS,
    model_dim: int = timing.MODEL_DIM,
) -> list[Row]:
    """Time every backend's fp8 and bf16 forward, and the peer's bf16, on every case; one :class:`Row` each.

    A call that cannot run (a backend that refuses the case, a peer missing here) gets a row with the
    reason in ``note``.
    """
    rows = []
    for head_dim in head_dims:
        for seqlen in seqlens:
            batch, heads = timing.convention_shape(seqlen=seqlen, head_dim=head_dim, tokens=tokens, model_dim=model_dim)
            gen = torch.Generator(device=device).manual_seed(seqlen * head_dim)
            shape = (batch, seqlen, heads, head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
            inputs: dict[str, Any] = {FP8: flash.fp8.quantize_qkv(q, k, v), BF16: {"q": q, "k": k, "v": v}}
            for causal in causals:
                want = {BF16: oracle(q, k, v, causal), FP8: oracle(*dequantized(inputs[FP8]), causal)}
                calls = [
                    (name, dtype, _flash_call(inputs[dtype], causal, name)) for name in backends for dtype in inputs
                ]
                if peer is not None:
                    calls.append((peer, BF16, _peer_call(peer, q, k, v, causal)))
                for name, dtype, call in calls:
                    row = Row(name, dtype, causal, head_dim, seqlen, batch, heads, None, None)
                    try:
                        with torch.no_grad():
                            row.max_error = (call().double() - want[dtype]).abs().max().item()
                            row.ms = timing.measure(call, device=device)
                        flops = timing.attention_flops(
                            batch=batch, heads=heads, seqlen_q=seqlen, seqlen_k=seqlen, head_dim=head_dim,
                            causal=causal, mode="fwd",
                        )  # fmt: skip
                        row.tflops = timing.tflops(flops, row.ms)
                    except Exception as error:  # a call that cannot run is recorded, not fatal
                        row.note = failure(error)
                    rows.append(row)
                    print(format_row(row), flush=True)
                del want
            del q, k, v, inputs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _flash_call(inputs: Any, causal: bool, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: flash.attention(**inputs, causal=causal, backend=backend)


def _peer_call(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> Callable[[], torch.Tensor]:
    run = provider(name)
    return lambda: run(q, k, v, causal)


# ----------------------------------------------------------------------------- reporting


def format_row(row: Row) -> str:
    """One progress line."""
    mask = "causal" if row.causal else "full"
    what = f"{row.provider:<11} {row.dtype:<8} {mask:<6} d={row.head_dim:<3} s={row.seqlen:<6}"
    return timed_line(what, row.ms, row.tflops, row.max_error, row.note)


def ratio_table(rows: list[Row], peer: str = PEER) -> str:
    """Per case, the peer's bf16 TFLOP/s, then each backend's fp8 TFLOP/s, its ratio to the same
    backend's bf16 and its ratio to the peer; backends in groups that fit 100 columns."""
    cases: dict[tuple[bool, int, int], dict[tuple[str, str], Row]] = {}
    for row in rows:
        cases.setdefault((row.causal, row.head_dim, row.seqlen), {})[(row.provider, row.dtype)] = row
    backends = sorted({r.provider for r in rows if r.dtype == FP8})
    per_table = max(1, (100 - 33) // (CELL + 1))
    tables = []
    for start in range(0, len(backends), per_table):
        group = backends[start : start + per_table]
        lines = [
            f"{'mask':<6} {'d':>3} {'seqlen':>6} {peer + ' bf16':>15}"
            + "".join(f" {b + ' fp8':>{CELL}}" for b in group)
        ]
        for (causal, head_dim, seqlen), by in sorted(cases.items()):
            base = _tflops(by.get((peer, BF16)))
            cells = []
            for b in group:
                fp8, bf16 = _tflops(by.get((b, FP8))), _tflops(by.get((b, BF16)))
                if fp8 is None:
                    cells.append(f" {'-':>{CELL}}")
                    continue
                own = f"{fp8 / bf16:.2f}x" if bf16 else "-"
                against = f"{fp8 / base:.2f}x" if base else "-"
                cells.append(f" {fp8:>8.1f} {own:>5} {against:>5}")
            mask = "causal" if causal else "full"
            peer_cell = f"{base:.1f}" if base else "-"
            lines.append(f"{mask:<6} {head_dim:>3} {seqlen:>6} {peer_cell:>15}" + "".join(cells))
        tables.append("\n".join(lines))
    header = f"fp8 forward TFLOP/s (ratio to the same backend's bf16, ratio to {peer} bf16):"
    return header + "\n" + "\n\n".join(tables) if tables else header + " no fp8 backend ran"


def _tflops(row: Row | None) -> float | None:
    return None if row is None else row.tflops


# ----------------------------------------------------------------------------- the section


class Fp8:
    name = "fp8"
    help = "TFLOP/s of fp8 forwards against the same backend's bf16 and SDPA cuDNN's bf16 (GPU)"
    devices: tuple[str, ...] = ("cuda",)
    default = False  # 30 cases of three timed calls and two float64 oracles each: opt in

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--fp8-head-dims", type=cli.int_list, default=list(DEFAULT_HEAD_DIMS), help="default: 64,128,256"
        )
        group.add_argument(
            "--fp8-causal", choices=("both", "yes", "no"), default="both", help="masks to time (default: both)"
        )

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        rows = measure(
            backends=options.backends or fp8_backends(device),
            seqlens=options.seqlens or DEFAULT_SEQLENS,
            head_dims=options.fp8_head_dims,
            causals={"both": [False, True], "yes": [True], "no": [False]}[options.fp8_causal],
            device=device,
        )
        convention = {
            "tokens": timing.TOKENS,
            "model_dim": timing.MODEL_DIM,
            "dtype": "fp8_e4m3 (per-head descale) and bf16",
            "peer": PEER,
        }
        return Report({"fp8": {"convention": convention, "rows": [asdict(r) for r in rows]}}, ratio_table(rows))


SECTION = Fp8()
