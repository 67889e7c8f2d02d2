"""``decode``: one decoding step against a KV cache, in GB/s, against the copy bandwidth and SDPA.

Decoding reads the whole cache once per step and computes little, so the measure is memory
bandwidth: the bytes of K and V read plus the queries and outputs (:func:`step_bytes`) over the
median time of a step (:func:`flash.timing.measure`, L2 flushed). The same run measures

* the device's copy bandwidth (a 2 GiB device-to-device copy, bytes read + written), the ceiling
  each rate is also given as a fraction of;
* PyTorch SDPA's flash and cuDNN kernels on the same keys (contiguous (batch, heads_kv, len,
  head_dim) copies, ``enable_gqa``) and compiled FlexAttention, when they can run;
* flash's KV-cache call (:func:`flash.attention_with_kvcache`) through every usable backend that has
  a KV-cache pass, on a contiguous cache and on paged ones (random page order), without appending;
  the maximum difference to SDPA flash's output says the numbers are for the right answer;
* per call, for the first case: the kernel time against the host's wall time per eager call
  (:func:`flash.timing.per_call_us`) and per replay of the step captured in a CUDA graph, the
  step appending one token (at a fixed position, so that any number of calls fits).

``--decode-sweep`` also times kernel configurations of the ``triton`` backend (tile keys, stages,
warps) on the first case, for its heuristics table. Targets (issue 10; reported, never asserted):
batch 16, GQA 32/8, d128, bf16 at 32k keys at least SDPA cuDNN's GB/s and 90% of the copy
bandwidth; at 4k keys at least cuDNN; batch 1 at 128k keys 80% of the copy bandwidth; paged caches
(pages of 16 and 64) within 10% of contiguous; a replayed step at most 15 us per call above the kernel time.

Results JSON: ``decode`` with ``copy_gbps``, ``rows`` (one per case and provider), ``per_call``
and ``sweep``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import flash
from flash import cli, kvplan, timing
from flash.heuristics import KernelConfig
from flash.heuristics import decode as decode_heuristics
from flash.registry import REGISTRY
from flash_bench.base import Report, failure
from flash_bench.providers import compiled_flex_attention, sdpa_context

PEERS = ("sdpa-flash", "sdpa-cudnn", "flex")
DTYPE = torch.bfloat16
#: Bytes of the copy that measures the device's bandwidth.
COPY_BYTES = 2 * 2**30
#: Targets of issue 10 (reported, never asserted).
TARGET_COPY_FRACTION = {32768: 0.9, 131072: 0.8}
TARGET_PAGED_SLOWDOWN = 0.10
TARGET_OVERHEAD_US = 15.0


@dataclass(frozen=True)
class Case:
    """One decoding step: ``batch`` sequences of ``length`` cached keys each, one new query."""

    batch: int
    length: int
    page_size: int | None = None  # None: a contiguous cache
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128

    @property
    def label(self) -> str:
        cache = f"paged {self.page_size}" if self.page_size else "contiguous"
        return f"b{self.batch} kv{self.length} {cache}"


@dataclass
class Row:
    case: str
    provider: str
    ms: float | None
    gbps: float | None
    copy_fraction: float | None = None
    max_error: float | None = None  # against SDPA flash's output
    note: str = ""


def step_bytes(case: Case, element_size: int = 2) -> int:
    """Bytes a step must move: every cached key and value, the queries read and the outputs written."""
    cache = 2 * case.batch * case.length * case.heads_kv * case.head_dim
    rows = 2 * case.batch * case.heads_q * case.head_dim
    return (cache + rows) * element_size


def copy_gbps(device: torch.device, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second, in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms = timing.measure(lambda: dst.copy_(src), device=device, flush_l2=False)
    return 2 * src.numel() / ms / 1e6


@dataclass
class Step:
    """The tensors of one case: the query, the cache (contiguous and as the case lays it out)."""

    q: torch.Tensor
    k: torch.Tensor  # (batch, length, heads_kv, d), contiguous
    v: torch.Tensor
    options: dict[str, Any]  # k_cache, v_cache, cache_seqlens and block_table for the case's layout


def make_step(case: Case, device: torch.device, dtype: torch.dtype) -> Step:
    gen = torch.Generator(device=device).manual_seed(case.length + case.batch)
    shape = (case.batch, case.length, case.heads_kv, case.head_dim)
    q = torch.randn(case.batch, 1, case.heads_q, case.head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(2))
    lengths = torch.full((case.batch,), case.length, dtype=torch.int32, device=device)
    options: dict[str, Any] = {"k_cache": k, "v_cache": v, "cache_seqlens": lengths}
    if case.page_size:
        per_sequence = -(-case.length // case.page_size)
        pool = case.batch * per_sequence
        order = torch.randperm(pool, generator=gen, device=device)
        table = order.view(case.batch, per_sequence).to(torch.int32)
        pages = (pool, case.page_size, case.heads_kv, case.head_dim)
        k_pool, v_pool = torch.empty(pages, device=device, dtype=dtype), torch.empty(pages, device=device, dtype=dtype)
        positions = torch.arange(case.length, device=device)
        page, slot = table.long()[:, positions // case.page_size], positions % case.page_size
        k_pool[page, slot], v_pool[page, slot] = k, v
        options.update(k_cache=k_pool, v_cache=v_pool, block_table=table)
    return Step(q, k, v, options)


def _flash(step: Step, backend: str) -> Callable[[], torch.Tensor]:
    return lambda: flash.attention_with_kvcache(step.q, **step.options, backend=backend)


def _sdpa(step: Step, kind: str) -> Callable[[], torch.Tensor]:
    # SDPA gets its best layout: contiguous (batch, heads, len, d) copies of the cache, made once.
    q, k, v = step.q.transpose(1, 2), step.k.transpose(1, 2).contiguous(), step.v.transpose(1, 2).contiguous()

    def run() -> torch.Tensor:
        with sdpa_context(kind):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)

    return run


def _flex(step: Step) -> Callable[[], torch.Tensor]:
    compiled = compiled_flex_attention()
    q, k, v = step.q.transpose(1, 2), step.k.transpose(1, 2).contiguous(), step.v.transpose(1, 2).contiguous()
    return lambda: compiled(q, k, v, enable_gqa=True).transpose(1, 2)


def _time(case: Case, name: str, run: Callable[[], torch.Tensor], reference: torch.Tensor | None, copy: float) -> Row:
    row = Row(case.label, name, None, None)
    try:
        with torch.no_grad():
            out = run()
            if reference is not None:
                row.max_error = (out.float() - reference).abs().max().item()
            row.ms = timing.measure(run, device=out.device)
        row.gbps = step_bytes(case) / row.ms / 1e6
        row.copy_fraction = row.gbps / copy if copy else None
    except Exception as error:  # a provider that cannot run a case is recorded, not fatal
        row.note = failure(error)
    print(format_row(row), flush=True)
    return row


def throughput(
    cases: list[Case],
    backends: list[str],
    peers: list[str],
    device: torch.device,
    copy: float,
) -> list[Row]:
    """Every provider on every case (peers on contiguous caches only: they have no paged layout)."""
    rows = []
    for case in cases:
        step = make_step(case, device, DTYPE)
        reference = None
        with torch.no_grad(), contextlib.suppress(Exception):  # SDPA flash is the yardstick where it runs
            reference = _sdpa(step, "sdpa-flash" if device.type == "cuda" else "sdpa")().float()
        for name in backends:
            rows.append(_time(case, name, _flash(step, name), reference, copy))
        for peer in [] if case.page_size else peers:
            try:
                run = _flex(step) if peer == "flex" else _sdpa(step, peer)
            except Exception as error:
                rows.append(Row(case.label, peer, None, None, note=failure(error)))
                continue
            rows.append(_time(case, peer, run, reference, copy))
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def per_call(case: Case, backend: str, device: torch.device) -> dict[str, Any]:
    """Kernel time, eager host time per call and CUDA-graph replay time per call of one appending step."""
    step = make_step(case, device, DTYPE)
    options = dict(step.options, cache_seqlens=step.options["cache_seqlens"] - 1)  # room for the new token
    new_k, new_v = (torch.randn(case.batch, 1, case.heads_kv, case.head_dim, device=device, dtype=DTYPE) for _ in "kv")

    def run() -> torch.Tensor:
        return flash.attention_with_kvcache(step.q, k=new_k, v=new_v, **options, backend=backend)

    result: dict[str, Any] = {"case": case.label, "backend": backend}
    try:
        with torch.no_grad():
            result["kernel_us"] = timing.measure(run, device=device, flush_l2=False) * 1e3
            result["eager_us"] = timing.per_call_us(run, device=device, calls=200)
    except Exception as error:  # a backend that cannot run the step is recorded, not fatal
        result["note"] = failure(error)
        print(f"per call, {case.label} ({backend}): {result['note']}", flush=True)
        return result
    if device.type == "cuda":
        try:
            with torch.no_grad():
                result["graph_us"] = timing.per_call_us(_graph(run), device=device, calls=200)
        except Exception as error:  # a step that cannot be captured is a finding, not a crash
            result["graph_note"] = failure(error)
    for mode in ("eager", "graph"):
        if f"{mode}_us" in result:
            result[f"{mode}_overhead_us"] = result[f"{mode}_us"] - result["kernel_us"]
    print(format_per_call(result), flush=True)
    return result


def _graph(run: Callable[[], object]) -> Callable[[], object]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (compilation, plans)
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def _triton_direct(
    step: Step, device: torch.device
) -> tuple[Callable[[dict[str, Any]], Callable[[], torch.Tensor]], dict[str, Any]]:
    """The ``triton`` backend's KV-cache kernel on ``step`` under changed knobs, called directly (spec
    and outputs made once): ``(call, base)``, ``call(knobs)`` giving the step with ``knobs`` over
    the table's configuration ``base`` (JSON); the step returns the output."""
    spec = kvplan.spec_of(
        kvplan.CallTensors(step.q, step.options["k_cache"], step.options["v_cache"], None, None,
                           step.options["cache_seqlens"], step.options.get("block_table"), None, None, None, None,
                           None, None),
        kvplan.CallOptions(False, False, None, 0.0, None, 0, None),
    )  # fmt: skip
    backend = REGISTRY.get("triton")
    base = decode_heuristics.config_for(backend, spec).to_json()
    out = torch.empty_like(step.q)
    lse = torch.empty(spec.lse_shape(), dtype=torch.float32, device=device)
    args = flash.DecodeArgs(step.q, step.options["k_cache"], step.options["v_cache"], step.options["cache_seqlens"],
                            out, lse, block_table=step.options.get("block_table"))  # fmt: skip

    def call(knobs: dict[str, Any]) -> Callable[[], torch.Tensor]:
        config = KernelConfig.from_json({**base, **knobs})

        def step() -> torch.Tensor:
            backend.decode(spec, args, config)
            return out

        return step

    return call, base


def sweep(case: Case, device: torch.device, copy: float) -> list[dict[str, Any]]:
    """The ``triton`` backend's KV-cache kernel under other configurations (tile keys, pipeline
    stages, warps), on ``case``: what its heuristics table should say."""
    call, _ = _triton_direct(make_step(case, device, DTYPE), device)
    rows = []
    for block_n in (32, 64, 128):
        for stages in (3, 4, 6, 8):
            for warps in (4, 8) if block_n == 64 else (4,):
                knobs = {"block_n": block_n, "num_stages": stages, "paged_num_stages": stages, "num_warps": warps}
                entry: dict[str, Any] = {"case": case.label, **knobs}
                try:
                    entry["ms"] = timing.measure(call(knobs), device=device)
                    entry["gbps"] = step_bytes(case) / entry["ms"] / 1e6
                    entry["copy_fraction"] = entry["gbps"] / copy
                except Exception as error:  # out of shared memory, say
                    entry["note"] = failure(error)
                rows.append(entry)
                found = f"{entry['gbps']:8.1f} GB/s" if "gbps" in entry else entry["note"][:60]
                print(f"sweep {case.label}: {block_n:>4} keys {stages} stages {warps} warps: {found}", flush=True)
    return rows


# ----------------------------------------------------------------------------- reporting


def format_row(row: Row) -> str:
    what = f"{row.case:<24} {row.provider:<11}"
    if row.gbps is None or row.ms is None:
        return f"{what} failed: {row.note}"[:100]
    error = f"  err {row.max_error:.1e}" if row.max_error is not None else ""
    share = f" ({row.copy_fraction:.0%} of copy)" if row.copy_fraction is not None else ""
    return f"{what} {row.ms * 1e3:9.1f} us {row.gbps:8.1f} GB/s{share}{error}"


def format_per_call(result: dict[str, Any]) -> str:
    if "kernel_us" not in result:
        return f"per call, {result['case']} ({result['backend']}): {result.get('note', '')}"
    parts = [f"kernel {result['kernel_us']:.1f} us", f"eager {result['eager_us']:.1f} us per call"]
    if "graph_us" in result:
        parts.append(f"graph {result['graph_us']:.1f} us per call")
    elif "graph_note" in result:
        parts.append(f"graph: {result['graph_note']}")
    return f"per call, {result['case']} ({result['backend']}): " + ", ".join(parts)


def summary(result: dict[str, Any]) -> str:
    """GB/s per case and provider, the ratios the targets name, and the per-call times."""
    rows = result["rows"]
    by = {(r["case"], r["provider"]): r for r in rows}
    lines = [f"decode: GB/s of K/V read (+ q/out); copy bandwidth {result['copy_gbps']:.0f} GB/s"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines.append(f"{'case':<24}" + "".join(f" {p:>12}" for p in providers))
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for p in providers:
            r = by.get((case, p))
            cells.append(f" {'-':>12}" if r is None or r["gbps"] is None else f" {r['gbps']:12.1f}")
        lines.append(f"{case:<24}" + "".join(cells))
    for case in dict.fromkeys(r["case"] for r in rows):
        flash_rows = [r for r in rows if r["case"] == case and r["provider"] not in PEERS and r["gbps"]]
        cudnn = by.get((case, "sdpa-cudnn"))
        for r in flash_rows:
            notes = [f"{r['copy_fraction']:.0%} of copy"] if r["copy_fraction"] else []
            if cudnn and cudnn["gbps"]:
                notes.append(f"{r['gbps'] / cudnn['gbps']:.2f}x cuDNN")
            if "paged" in case:
                contiguous = by.get((case.split(" paged")[0] + " contiguous", r["provider"]))
                if contiguous and contiguous["gbps"]:
                    slower = 1 - r["gbps"] / contiguous["gbps"]
                    verdict = "within" if slower <= TARGET_PAGED_SLOWDOWN else "beyond"
                    notes.append(f"{slower:+.0%} vs contiguous ({verdict} 10%)")
            lines.append(f"{case:<24} {r['provider']:<11} " + ", ".join(notes))
    for entry in result["per_call"]:
        lines.append(format_per_call(entry))
        for mode in ("eager", "graph"):
            if f"{mode}_overhead_us" in entry:
                over = entry[f"{mode}_overhead_us"]
                verdict = "within" if over <= TARGET_OVERHEAD_US else "above"
                lines.append(f"  {mode} overhead over the kernel: {over:+.1f} us ({verdict} the 15 us target)")
    for case in dict.fromkeys(s["case"] for s in result["sweep"]):
        best = max(
            (s for s in result["sweep"] if s["case"] == case and "gbps" in s), key=lambda s: s["gbps"], default=None
        )
        if best:
            lines.append(
                f"sweep best, {case}: {best['block_n']} keys, {best['num_stages']} stages, {best['num_warps']} warps: "
                f"{best['gbps']:.1f} GB/s ({best['copy_fraction']:.0%} of copy)"
            )
    return "\n".join(line[:100] for line in lines)


def default_cases(lengths: list[int], batch: int, pages: list[int], long: int) -> list[Case]:
    cases = [Case(batch, length) for length in lengths]
    cases += [Case(batch, max(lengths), page_size=page) for page in pages]
    if long:
        cases.append(Case(1, long))
    return cases


def measure(
    *,
    cases: list[Case],
    backends: list[str],
    peers: list[str],
    device: torch.device,
    do_sweep: bool,
) -> dict[str, Any]:
    copy = copy_gbps(device, COPY_BYTES if device.type == "cuda" else 2**24)
    print(f"copy bandwidth: {copy:.1f} GB/s (bytes read + written)", flush=True)
    first = make_step(cases[0], device, DTYPE)
    explained = [str(flash.explain_kvcache(first.q, **first.options, backend=name)) for name in backends]
    del first
    print("\n".join(explained), flush=True)
    rows = throughput(cases, backends, peers, device, copy)
    calls = [per_call(cases[0], name, device) for name in backends]
    swept = []
    if do_sweep and "triton" in backends and device.type == "cuda":  # a contiguous and a paged cache
        for case in [cases[0], *[c for c in cases if c.page_size][:1]]:
            swept += sweep(case, device, copy)
    return {
        "copy_gbps": copy,
        "problem": {"heads_q": cases[0].heads_q, "heads_kv": cases[0].heads_kv, "head_dim": cases[0].head_dim},
        "explain": explained,
        "rows": [asdict(r) for r in rows],
        "per_call": calls,
        "sweep": swept,
        "targets": {
            "copy_fraction": TARGET_COPY_FRACTION,
            "paged_slowdown": TARGET_PAGED_SLOWDOWN,
            "overhead_us": TARGET_OVERHEAD_US,
        },
    }


def decode_backends(device: torch.device) -> list[str]:
    """Usable backends with a KV-cache pass for a bf16 step on ``device`` (the reference's only on a CPU)."""
    names = []
    for info in flash.backends():
        if not info.usable or (info.name == "reference" and device.type == "cuda"):
            continue
        support = getattr(REGISTRY.get(info.name), "decode_support", None)
        if support is not None and device.type in support.devices:
            names.append(info.name)
    return names


class Decode:
    name = "decode"
    help = "GB/s of a decoding step against a KV cache, copy bandwidth, SDPA/Flex, CUDA graphs (GPU)"
    devices: tuple[str, ...] = ("cuda",)
    default = False

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--decode-lengths", type=cli.int_list, default=[4096, 32768], help="default: 4096,32768")
        group.add_argument("--decode-batch", type=cli.positive_int, default=16, help="default: 16")
        group.add_argument("--decode-pages", type=cli.int_list, default=[16, 64], help="page sizes (default: 16,64)")
        group.add_argument(
            "--decode-long", type=int, default=131072, help="keys of the batch-1 case (default 131072; 0: none)"
        )
        group.add_argument("--decode-sweep", action="store_true", help="also sweep the triton kernel's configuration")

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        backends = options.backends or decode_backends(device)
        cases = default_cases(options.decode_lengths, options.decode_batch, options.decode_pages, options.decode_long)
        result = measure(
            cases=cases,
            backends=backends,
            peers=list(PEERS),
            device=device,
            do_sweep=options.decode_sweep,
        )
        return Report({"decode": result}, summary(result))


SECTION = Decode()
