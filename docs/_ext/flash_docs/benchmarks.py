"""Plots of the committed benchmark results (``python -m flash bench`` JSON), drawn at build time.

Each result file is one run on one machine: its ``environment`` (GPU, date, versions) is printed
under every plot drawn from it. GPU files carry ``rows`` (TFLOP/s per provider and case) and
``memory``; CPU files carry ``cpu`` rows; the ``overhead`` section (host time per call of a tiny
problem) is shown as a table; the ``fp8`` section (each backend's fp8 forward next to its bf16 one
and cuDNN's) as plots and a table. Nothing is plotted that is not in a file.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import admonition, code, esc, figure, list_table, write_if_changed

logger = logging.getLogger(__name__)

PEERS = ("sdpa-flash", "sdpa-cudnn", "flex", "sdpa-mem-efficient", "naive")
PEER_LABELS = {
    "sdpa-flash": "torch SDPA flash (FA2)",
    "sdpa-cudnn": "torch SDPA cuDNN",
    "flex": "FlexAttention (compiled)",
    "naive": "naive attention",
}
ENV_KEYS = (
    "gpu",
    "date",
    "torch",
    "triton",
    "cuda",
    "flash-core",
    "flash-triton",
    "flash-cuda",
    "flash-bench",
    "cupy-cuda13x",
    "cupy-cuda12x",
    "python",
    "cpu",
)


def environment_line(env: dict) -> str:
    parts = [f"{k} {env[k]}" for k in ENV_KEYS if env.get(k)]
    return "; ".join(parts)


#: Peers keep one muted colour each across every plot; flash's backends take the strong ones.
PEER_COLOURS = {
    "sdpa-flash": "#555555",
    "sdpa-cudnn": "#59a14f",
    "flex": "#76b7b2",
    "sdpa-mem-efficient": "#b07aa1",
    "naive": "#9c9c9c",
}
FLASH_COLOURS = ["#d1495b", "#2e6fba", "#edae49", "#8e44ad", "#00798c"]


def _style(provider: str, index: int) -> dict:
    peer = provider in PEERS
    return {
        "color": PEER_COLOURS.get(provider, "#555555") if peer else FLASH_COLOURS[index % len(FLASH_COLOURS)],
        "linestyle": "--" if peer else "-",
        "marker": "s" if peer else "o",
        "linewidth": 1.4 if peer else 2.4,
        "markersize": 4 if peer else 5,
    }


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    write_if_changed(path, buffer.getvalue())


def _providers(rows: list[dict]) -> list[str]:
    names = sorted({r["provider"] for r in rows}, key=lambda p: (p in PEERS, PEERS.index(p) if p in PEERS else 0, p))
    return names


def _tflops_points(rows: list[dict]) -> list[tuple[int, float]]:
    return sorted((r["seqlen"], r["tflops"]) for r in rows if r.get("tflops"))


def plot_throughput(rows: list[dict], title: str, path: Path) -> None:
    series = []
    for index, name in enumerate(_providers(rows)):
        points = _tflops_points([r for r in rows if r["provider"] == name])
        series.append((PEER_LABELS.get(name, f"flash: {name}"), points, _style(name, index)))
    _plot_series(series, sorted({r["seqlen"] for r in rows}), title, path)


def plot_fp8(rows: list[dict], title: str, path: Path) -> None:
    """Each backend's fp8 forward (solid) and bf16 forward (dotted, same colour), and the bf16 peer."""
    series = []
    for index, name in enumerate(_providers(rows)):
        for dtype in ("fp8_e4m3", "bf16"):
            points = _tflops_points([r for r in rows if r["provider"] == name and r["dtype"] == dtype])
            style = _style(name, index)
            if name in PEERS:
                label = f"{PEER_LABELS.get(name, name)}, bf16"
            else:
                label = f"flash: {name}, {'fp8 e4m3' if dtype == 'fp8_e4m3' else 'bf16'}"
                if dtype == "bf16":
                    style.update(linestyle=":", marker="^", linewidth=1.6)
            series.append((label, points, style))
    _plot_series(series, sorted({r["seqlen"] for r in rows}), title, path)


def _plot_series(series: list[tuple[str, list, dict]], seqlens: list[int], title: str, path: Path) -> None:
    """TFLOP/s against sequence length, one line per (label, points, style) that has points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for label, points, style in series:
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
    ax.set_xlabel("sequence length (batch × seqlen = 16k tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=12)
    ax.xaxis.label.set_size(11)
    ax.yaxis.label.set_size(11)
    ax.tick_params(labelsize=10)
    ax.legend(fontsize=9.5, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_memory(memory: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for index, name in enumerate(_providers(memory)):
        points = sorted((m["seqlen"], m["extra_mib"]) for m in memory if m["provider"] == name and m.get("extra_mib"))
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=PEER_LABELS.get(name, f"flash: {name}"), **_style(name, index))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqlens = sorted({m["seqlen"] for m in memory})
    ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("extra device memory of one forward (MiB)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_cpu(cpu: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = sorted(cpu, key=lambda r: r["seqlen"])
    xs = [r["seqlen"] for r in cpu]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.8))
    left.plot(xs, [r["reference_ms"] for r in cpu], label="flash reference backend", **_style("reference", 0))
    left.plot(xs, [r["sdpa_ms"] for r in cpu], label="torch CPU SDPA", **_style("sdpa-flash", 1))
    left.set_ylabel("milliseconds (median)")
    right.plot(xs, [r["reference_peak_mib"] for r in cpu], label="flash reference backend", **_style("reference", 0))
    right.plot(xs, [r["naive_peak_mib"] for r in cpu], label="naive attention", **_style("naive", 1))
    right.set_ylabel("peak extra host memory (MiB)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("sequence length")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _ratio_table(rows: list[dict]) -> str:
    """TFLOP/s at the longest sequence of each case, and the ratio to torch SDPA flash."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        cases[(r["mode"], r["causal"], r["head_dim"])].setdefault(r["provider"], {})[r["seqlen"]] = r
    providers = _providers(rows)
    lines = []
    for (mode, causal, head_dim), by in sorted(cases.items()):
        longest = max(s for runs in by.values() for s in runs)
        base = by.get("sdpa-flash", {}).get(longest, {}).get("tflops")
        cells = []
        for p in providers:
            r = by.get(p, {}).get(longest)
            if not r or not r.get("tflops"):
                cells.append("—")
                continue
            ratio = f" ({r['tflops'] / base:.2f}×)" if base else ""
            cells.append(f"{r['tflops']:.0f}{ratio}")
        lines.append([esc(mode), "causal" if causal else "full", str(head_dim), str(longest), *cells])
    return list_table(
        ["mode", "mask", "d", "seqlen"] + [code(p) for p in providers],
        lines,
        title="TFLOP/s at the longest sequence (ratio to torch SDPA flash)",
        classes="flash-numbers",
    )


def _overhead_table(timed: dict, env_line: str) -> str:
    """Microseconds per call of each provider, forward and forward+backward, and flash - SDPA."""
    by = {(r["provider"], r["mode"]): r.get("us_per_call") for r in timed["rows"]}
    providers = list(dict.fromkeys(r["provider"] for r in timed["rows"]))
    rows = [
        [code(p), *("—" if by.get((p, m)) is None else f"{by[(p, m)]:.1f}" for m in ("fwd", "fwd_bwd"))]
        for p in providers
    ]
    p = timed["problem"]
    title = (
        f"Host µs per call, {p['seqlen_q']} query × {p['seqlen_k']} keys, {p['heads']} heads, head_dim "
        f"{p['head_dim']}, {p['dtype']}, {p['device']}, {timed['calls']} calls"
    )
    text = [list_table(["provider", "forward", "forward + backward"], rows, title=esc(title), classes="flash-numbers")]
    gaps = [f"{esc(d['mode'])} against {code(d['peer'])}: {d['delta_us']:+.1f} µs" for d in timed.get("deltas", [])]
    if gaps:
        target = timed.get("target_us")
        text.append(f"flash − SDPA (target: within {target:g} µs): " + "; ".join(gaps) + f". {env_line}.\n")
    return "\n".join(text)


def _decode_table(decode: dict, env_line: str) -> str:
    """GB/s of one decoding step per case and provider, and the copy bandwidth of the same run."""
    by = {(r["case"], r["provider"]): r for r in decode["rows"]}
    cases = list(dict.fromkeys(r["case"] for r in decode["rows"]))
    providers = list(dict.fromkeys(r["provider"] for r in decode["rows"]))
    rows = []
    for case in cases:
        cells = []
        for p in providers:
            r = by.get((case, p))
            cells.append("—" if not r or r.get("gbps") is None else f"{r['gbps']:.0f}")
        rows.append([esc(case), *cells])
    p = decode.get("problem", {})
    title = (
        f"Decoding step, GB/s of K/V (+ queries and outputs) read; heads {p.get('heads_q')}/{p.get('heads_kv')}, "
        f"head_dim {p.get('head_dim')}; copy bandwidth {decode['copy_gbps']:.0f} GB/s"
    )
    table = list_table(["case", *(code(p) for p in providers)], rows, title=esc(title), classes="flash-numbers")
    return table + f"\n{env_line}.\n"


def _masks_table(masks: dict, env_line: str) -> str:
    """Milliseconds and TFLOP/s of every masks case and provider, then the targets, met or not."""
    rows = [
        [
            esc(r["section"]),
            esc(r["case"]),
            code(r["provider"]),
            esc(r["mode"]),
            "—" if r.get("ms") is None else f"{r['ms']:.3f}",
            "—" if r.get("tflops") is None else f"{r['tflops']:.0f}",
        ]
        for r in masks["rows"]
    ]
    title = "Masks on the kernels against FlexAttention and PyTorch SDPA (bf16, head_dim 128)"
    headers = ["part", "case", "provider", "mode", "ms", "TFLOP/s"]
    text = [list_table(headers, rows, title=esc(title), classes="flash-numbers")]
    if masks.get("targets"):
        text += ["Targets:", "", *(f"* {esc(' '.join(t.split()))}" for t in masks["targets"]), ""]
    text.append(f"{env_line}.\n")
    return "\n".join(text)


def _fp8_part(fp8: dict, stem: str, outdir: Path, produced: set[str], env_line: str) -> str:
    """Plots of the fp8 section (fp8 and bf16 of each backend, cuDNN's bf16) per mask and head dim,
    and a table of the ratios at the longest sequence."""
    rows = fp8["rows"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(bool(r["causal"]), int(r["head_dim"]))].append(r)
    text = [".. container:: flash-figure-grid", ""]
    for (causal, head_dim), group in sorted(groups.items()):
        label = f"fp8 forward, {'causal' if causal else 'non-causal'}, head_dim {head_dim}"
        name = f"{stem}-fp8-{'causal' if causal else 'full'}-d{head_dim}.png"
        plot_fp8(group, label, outdir / name)
        produced.add(name)
        caption = f"{esc(label)}: float8_e4m3fn with per-head descale factors (solid), bf16 (dotted). {env_line}."
        fig = figure(f"/_generated/bench/{name}", caption, alt=f"TFLOP/s, {label}")
        text.append("\n".join("   " + line if line else "" for line in fig.split("\n")))
    text.append(_fp8_table(rows, fp8.get("convention", {}).get("peer", "sdpa-cudnn")))
    return "\n".join(text)


def _fp8_table(rows: list[dict], peer: str) -> str:
    """fp8 TFLOP/s at the longest sequence of each case, its ratios to the same backend's bf16 and to
    the peer's bf16, and the largest error against the float64 oracle."""
    by = {(r["provider"], r["dtype"], bool(r["causal"]), int(r["head_dim"]), int(r["seqlen"])): r for r in rows}
    backends = sorted({r["provider"] for r in rows if r["dtype"] == "fp8_e4m3"})
    lines = []
    for causal, head_dim in sorted({(bool(r["causal"]), int(r["head_dim"])) for r in rows}):
        longest = max(int(r["seqlen"]) for r in rows if (bool(r["causal"]), int(r["head_dim"])) == (causal, head_dim))
        base = (by.get((peer, "bf16", causal, head_dim, longest)) or {}).get("tflops")
        cells = ["—" if not base else f"{base:.0f}"]
        for b in backends:
            fp8 = (by.get((b, "fp8_e4m3", causal, head_dim, longest)) or {}).get("tflops")
            bf16 = (by.get((b, "bf16", causal, head_dim, longest)) or {}).get("tflops")
            if not fp8:
                cells.append("—")
                continue
            ratios = [f"{fp8 / bf16:.2f}× bf16"] if bf16 else []
            ratios += [f"{fp8 / base:.2f}× cuDNN"] if base else []
            cells.append(f"{fp8:.0f}" + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(["causal" if causal else "full", str(head_dim), str(longest), *cells])
    errors = []
    for b in backends:
        for dtype in ("fp8_e4m3", "bf16"):
            found = [r["max_error"] for r in rows if r["provider"] == b and r["dtype"] == dtype and r.get("max_error")]
            if found:
                errors.append(f"{code(b)} {dtype.replace('_', ' ')} {max(found):.1e}")
    table = list_table(
        ["mask", "d", "seqlen", f"{code(peer)} bf16", *(f"{code(b)} fp8" for b in backends)],
        lines,
        title="fp8 forward TFLOP/s at the longest sequence (ratio to the same backend's bf16, to cuDNN's bf16)",
        classes="flash-numbers",
    )
    note = "Largest error against a float64 oracle on the inputs each call received: " + "; ".join(errors) + "."
    return table + ("\n" + note + "\n" if errors else "")


def render_file(path: Path, outdir: Path, docname_prefix: str, produced: set[str]) -> str:
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    where = env.get("gpu") or f"CPU ({env.get('cpu', '?')})"
    env_line = esc(environment_line(env))
    text = [f".. rubric:: {esc(where)}, {esc(env.get('date', 'undated'))} ({code(path.name)})", ""]
    stem = f"{docname_prefix}{path.stem}"
    rows = data.get("rows") or []
    if rows:
        if data.get("convention"):
            c = data["convention"]
            text += [
                f"Convention: {esc(c.get('tokens'))} tokens per batch, model dimension {esc(c.get('model_dim'))}, "
                f"{esc(c.get('dtype'))}, forward+backward FLOPs = {esc(c.get('fwd_bwd_factor'))} × forward.",
                "",
            ]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            groups[(r["mode"], bool(r["causal"]), int(r["head_dim"]))].append(r)
        text += [".. container:: flash-figure-grid", ""]
        for (mode, causal, head_dim), group in sorted(groups.items()):
            what = "forward" if mode == "fwd" else "forward + backward"
            label = f"{what}, {'causal' if causal else 'non-causal'}, head_dim {head_dim}"
            name = f"{stem}-{mode}-{'causal' if causal else 'full'}-d{head_dim}.png"
            plot_throughput(group, label, outdir / name)
            produced.add(name)
            fig = figure(f"/_generated/bench/{name}", f"{esc(label)}. {env_line}.", alt=f"TFLOP/s, {label}")
            text.append("\n".join("   " + line if line else "" for line in fig.split("\n")))
        text.append(_ratio_table(rows))
        failed: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get("ms") is None:
                failed[(r["provider"], r["mode"], r.get("note") or "no time")].append(r)
        if failed:
            items = []
            for (provider, mode, note), cases in sorted(failed.items()):
                where = ", ".join(sorted({f"{'causal' if r['causal'] else 'full'} d={r['head_dim']}" for r in cases}))
                seqlens = ", ".join(str(x) for x in sorted({r["seqlen"] for r in cases}))
                items.append(
                    f"* {code(provider)} {esc(mode)}, {len(cases)} cases ({esc(where)}; seqlen {seqlens}): {esc(note)}"
                )
            text += ["Cases that did not run:", "", *items, ""]
    memory = data.get("memory") or []
    if memory:
        name = f"{stem}-memory.png"
        plot_memory(memory, outdir / name)
        produced.add(name)
        oom = sorted({f"{m['provider']} at {m['seqlen']}" for m in memory if m.get("extra_mib") is None})
        note = f" Out of memory: {esc(', '.join(oom))}." if oom else ""
        text.append(
            figure(
                f"/_generated/bench/{name}",
                f"Extra memory of one forward (bf16, batch 1, 16 heads, head_dim 128) next to naive "
                f"attention, which forms the seqlen × seqlen matrix.{note} {env_line}.",
                alt="memory against sequence length",
            )
        )
    cpu = data.get("cpu") or []
    if cpu:
        name = f"{stem}-cpu.png"
        plot_cpu(cpu, outdir / name)
        produced.add(name)
        first = cpu[0]
        text.append(
            figure(
                f"/_generated/bench/{name}",
                f"CPU, float32, batch 1, {first.get('heads')} heads, head_dim {first.get('head_dim')}: "
                f"time of the reference backend next to torch's CPU SDPA, and peak memory next to naive "
                f"attention. {env_line}.",
                alt="CPU time and memory against sequence length",
            )
        )
    timed = data.get("overhead")
    if timed:
        text.append(_overhead_table(timed, env_line))
    decode = data.get("decode")
    if decode and decode.get("rows"):
        text.append(_decode_table(decode, env_line))
    masks = data.get("masks")
    if masks and masks.get("rows"):
        text.append(_masks_table(masks, env_line))
    fp8 = data.get("fp8")
    if fp8 and fp8.get("rows"):
        text.append(_fp8_part(fp8, stem, outdir, produced, env_line))
    if not (rows or memory or cpu or timed or decode or masks or fp8):
        kinds = "``rows``, ``memory``, ``cpu``, ``overhead``, ``decode``, ``masks`` or ``fp8``"
        text.append(f"{code(path.name)} holds no {kinds} results.\n")
    return "\n".join(text)


class Benchmarks(SphinxDirective):
    """Every results file, newest (and broadest) first; or a plain statement that none is committed."""

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()
        results = Path(self.env.srcdir, self.config.flash_bench_results)
        files = sorted(results.glob("*.json")) if results.is_dir() else []
        parsed = []
        for path in files:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                logger.warning("benchmark results %s cannot be read: %s", path, error, location=self.get_location())
                continue
            self.env.note_dependency(str(path))
            parsed.append((data.get("environment", {}).get("date", ""), path, data))
        has_gpu = any(d.get("rows") or d.get("memory") or d.get("fp8") for _, _, d in parsed)
        text = []
        if not has_gpu:
            text.append(
                admonition(
                    "important",
                    (
                        "**No GPU results are committed yet.** The plots on this page are drawn only from result files "
                        "in ``docs/benchmarks/results/``, written by ``python -m flash bench`` on a GPU; until one is "
                        "committed there is nothing to plot, and no number is shown in its place."
                    ),
                )
            )
        outdir = Path(self.env.srcdir) / "_generated" / "bench"
        produced: set[str] = set()

        def newest_broadest_first(item: tuple) -> tuple:  # one day's runs: the one comparing the most first
            date, path, data = item
            return date, len({r["provider"] for r in data.get("rows", [])}), path.name

        for _, path, _ in sorted(parsed, key=newest_broadest_first, reverse=True):
            try:
                text.append(render_file(path, outdir, "bench-", produced))
            except (KeyError, TypeError, ValueError) as error:
                logger.warning("benchmark results %s are malformed: %r", path, error, location=self.get_location())
        for stale in outdir.glob("*.png") if outdir.is_dir() else []:  # plots of files no longer there
            if stale.name not in produced:
                stale.unlink()
        return self.parse_text_to_nodes("\n".join(text))
