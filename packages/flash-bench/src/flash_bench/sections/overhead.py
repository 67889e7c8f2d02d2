"""``overhead``: what one call of a tiny problem costs the caller, in host microseconds.

One query, 16 keys, 8 heads, head_dim 64 (bf16 on a GPU, float32 on the CPU): the kernels take
almost no time, so the host wall time per call (:func:`flash.timing.per_call_us`, many calls,
synchronised at the end) is the cost of getting to them. Timed through

* ``flash``: eager :func:`flash.attention` (automatic dispatch), forward and forward+backward;
* ``launch:<backend>``: the backend's own ``forward(spec, args)`` on preallocated outputs, so the
  difference to ``flash`` is the cost of the API (validation, dispatch, allocation, autograd);
* ``sdpa``, ``sdpa-flash``, ``sdpa-cudnn``: PyTorch's attention, forward and forward+backward;
* ``flash-graph`` (GPU): the ``flash.attention`` forward captured in a CUDA graph and replayed.

The summary gives ``flash - sdpa`` for each SDPA kernel. The target (issue 8) is eager flash within
:data:`TARGET_US` of SDPA's own time per call, forward and forward+backward; this section reports
the gap and never asserts it.

Results JSON: ``overhead`` with the ``problem``, ``calls``, ``rows`` (provider, mode,
``us_per_call`` or a ``note``) and ``deltas``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import flash
from flash import cli, dispatch, heuristics, timing
from flash.backend import ForwardArgs
from flash.registry import REGISTRY
from flash.spec import canonical, canonical_lse
from flash_bench.base import Report, failure
from flash_bench.providers import sdpa_bhsd, sdpa_context

BATCH, SEQLEN_Q, SEQLEN_K, HEADS, HEAD_DIM = 1, 1, 16, 8, 64
#: Microseconds per call eager flash.attention may spend above SDPA's own (the issue's target).
TARGET_US = 10.0
SDPA_KINDS = ("sdpa", "sdpa-flash", "sdpa-cudnn")


@dataclass
class Row:
    provider: str
    mode: str  # "fwd" or "fwd_bwd"
    us_per_call: float | None
    note: str = ""


class _Timer:
    """Times providers into rows; a provider that cannot run becomes a row with the reason."""

    def __init__(self, device: torch.device, calls: int) -> None:
        self.device, self.calls, self.rows = device, calls, list[Row]()

    def time(
        self,
        provider: str,
        mode: str,
        fn: Callable[[], object],
        context: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        try:
            with context or contextlib.nullcontext():
                us = timing.per_call_us(fn, device=self.device, calls=self.calls, warmup=min(20, self.calls))
        except Exception as error:  # recorded, not fatal: SDPA's cuDNN kernel is not on every machine
            self.failed(provider, mode, error)
            return
        self.add(Row(provider, mode, us))

    def failed(self, provider: str, mode: str, error: Exception | str) -> None:
        """Record that ``provider`` could not run ``mode``, and why."""
        self.add(Row(provider, mode, None, failure(error) if isinstance(error, Exception) else error))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    def us(self, provider: str, mode: str) -> float | None:
        return next((r.us_per_call for r in self.rows if (r.provider, r.mode) == (provider, mode)), None)


def _launch(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    """The backend's forward with its table's configuration on preallocated outputs, as core runs it."""
    spec = flash.build_spec(q, k, v)
    chosen = REGISTRY.get(backend)
    config = heuristics.config_for(chosen, spec, "forward")
    out = torch.empty(q.shape, dtype=spec.out_dtype, device=q.device)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype, device=q.device)
    c = canonical
    args = ForwardArgs(c(q, spec), c(k, spec), c(v, spec), c(out, spec), canonical_lse(lse, spec))
    return lambda: chosen.forward(spec, args, config)


def _graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    """``flash.attention(q, k, v)`` captured in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
        for _ in range(3):
            flash.attention(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash.attention(q, k, v)
    return graph.replay


def _inputs(device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient of the tiny problem."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(BATCH, SEQLEN_Q, HEADS, HEAD_DIM)] + [(BATCH, SEQLEN_K, HEADS, HEAD_DIM)] * 2
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for shape in shapes)
    return q, k, v, torch.randn_like(q)


def _fwd_bwd(run: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dout: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(run(*inputs), inputs, dout)


def _sdpa_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sdpa_bhsd(q, k, v, False)


def measure(*, device: torch.device, calls: int, backends: list[str] | None) -> dict[str, Any]:
    """Every row of the section, and the flash - SDPA deltas."""
    q, k, v, dout = _inputs(device)
    grad_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    timer = _Timer(device, calls)
    timer.time("flash", "fwd", lambda: flash.attention(q, k, v))
    timer.time("flash", "fwd_bwd", _fwd_bwd(flash.attention, grad_inputs, dout))
    spec = flash.build_spec(q, k, v)
    for name in backends or [info.name for info in flash.backends() if info.usable]:
        reasons = dispatch.rejection_reasons(name, spec, "forward")
        if reasons:
            timer.failed(f"launch:{name}", "fwd", "cannot run: " + "; ".join(reasons))
            continue
        timer.time(f"launch:{name}", "fwd", _launch(name, q, k, v))
    # SDPA gets its own (batch, heads, seqlen, head_dim) layout: views, made once, outside the loop.
    qt, kt, vt, dout_t = (t.transpose(1, 2) for t in (q, k, v, dout))
    grad_t = [t.transpose(1, 2) for t in grad_inputs]
    for kind in SDPA_KINDS if device.type == "cuda" else SDPA_KINDS[:1]:
        timer.time(kind, "fwd", lambda: _sdpa_full(qt, kt, vt), sdpa_context(kind))
        timer.time(kind, "fwd_bwd", _fwd_bwd(_sdpa_full, grad_t, dout_t), sdpa_context(kind))
    if device.type == "cuda":
        try:
            replay = _graph(q, k, v)
        except Exception as error:  # a call that cannot be captured is a finding, not a crash
            timer.failed("flash-graph", "fwd", error)
        else:
            timer.time("flash-graph", "fwd", replay)
    deltas = []
    for mode in ("fwd", "fwd_bwd"):
        ours = timer.us("flash", mode)
        for kind in SDPA_KINDS:
            theirs = timer.us(kind, mode)
            if ours is not None and theirs is not None:
                deltas.append(
                    {"mode": mode, "peer": kind, "flash_us": ours, "peer_us": theirs, "delta_us": ours - theirs}
                )
    problem = {
        "batch": BATCH,
        "seqlen_q": SEQLEN_Q,
        "seqlen_k": SEQLEN_K,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": str(q.dtype).replace("torch.", ""),
        "device": str(device),
        "backends": {p: dispatch.decide(spec, p).chosen for p in ("forward", "backward")},
    }
    rows = [asdict(r) for r in timer.rows]
    return {"problem": problem, "calls": calls, "target_us": TARGET_US, "rows": rows, "deltas": deltas}


# ----------------------------------------------------------------------------- reporting


def format_row(row: Row) -> str:
    """One progress line."""
    what = f"{row.provider:<18} {row.mode:<7}"
    if row.us_per_call is None:
        return f"{what} {row.note}"[:100]
    return f"{what} {row.us_per_call:10.1f} us per call"


def summary(result: dict[str, Any]) -> str:
    """The per-call table and the flash - SDPA deltas against the target."""
    p = result["problem"]
    lines = [
        f"overhead: {p['seqlen_q']} query x {p['seqlen_k']} keys, {p['heads']} heads, head_dim {p['head_dim']}, "
        f"{p['dtype']} on {p['device']}; host us per call over {result['calls']} calls",
        f"{'provider':<18} {'fwd us':>10} {'fwd+bwd us':>12}",
    ]
    by = {(r["provider"], r["mode"]): r["us_per_call"] for r in result["rows"]}
    for name in dict.fromkeys(r["provider"] for r in result["rows"]):
        cells = [by.get((name, mode)) for mode in ("fwd", "fwd_bwd")]
        lines.append(
            f"{name:<18}" + "".join(f" {'-' if c is None else f'{c:.1f}':>{w}}" for c, w in zip(cells, (10, 12)))
        )
    for d in result["deltas"]:
        verdict = "within" if d["delta_us"] <= result["target_us"] else "above"
        target = f"{verdict} the {result['target_us']:.0f} us target"
        lines.append(f"flash - {d['peer']:<10} {d['mode']:<7} {d['delta_us']:+10.1f} us ({target})")
    return "\n".join(lines)


class Overhead:
    name = "overhead"
    help = "host time per call of a tiny problem: flash, its backends' launches, SDPA, a CUDA graph"
    devices: tuple[str, ...] = ("cuda", "cpu")
    default = True

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--overhead-calls", type=cli.positive_int, default=400, help="calls timed per provider (default 400)"
        )

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        result = measure(device=device, calls=options.overhead_calls, backends=options.backends)
        return Report({"overhead": result}, summary(result))


SECTION = Overhead()
