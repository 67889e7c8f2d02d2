"""The kernel-configuration table and the shared-memory arithmetic, read from flash.heuristics."""

from __future__ import annotations

from collections import defaultdict

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import code, esc, list_table

ELEMENT_BYTES = {"fp8": 1, "fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def grouped_entries():
    """Table entries regrouped as the JSON rows wrote them: one group per (backend, arch, pass, config, provenance)."""
    from flash import heuristics

    groups: dict[tuple, dict[str, set]] = defaultdict(lambda: {"dtype": set(), "head_dim": set(), "causal": set()})
    entries = [item for table in heuristics.installed_tables().values() for item in table.items()]
    for key, entry in entries:
        group = groups[(key.backend, key.arch, key.pass_, entry.config, entry.provenance)]
        group["dtype"].add(key.dtype)
        group["head_dim"].add(key.head_dim)
        group["causal"].add(key.causal)
    order = {"forward": 0, "backward": 1}
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 2), min(kv[1]["head_dim"])))


def _provenance_text(provenance) -> str:
    """The provenance without its kind (shown in bold beside it); measured entries keep GPU, date, versions."""
    if provenance.kind == "measured":
        return str(provenance).removeprefix("measured ")
    return provenance.note


def _smem_cell(backend: str, config, arch: str, dtypes: set[str], head_dims: set[int], pass_: str) -> str:
    from flash.heuristics import smem
    from flash.registry import REGISTRY

    if arch not in smem.MAX_SMEM_PER_BLOCK:
        return "—"
    elem = max(ELEMENT_BYTES.get(d, 2) for d in dtypes)
    b = smem.budget(config, arch, REGISTRY.get(backend).shared_memory_row(max(head_dims)), elem, pass_)
    mark = "✓" if b.fits else "✗ does not fit"
    return f"{b.needed / 1024:.0f} of {b.available / 1024:.0f} KiB {mark}"


class HeuristicsTable(SphinxDirective):
    """One table per backend of ``flash.heuristics.table()``, with provenance and shared-memory use."""

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()
        by_backend: dict[str, list] = defaultdict(list)
        for (backend, arch, pass_, config, provenance), values in grouped_entries():
            masks = {(False,): "non-causal", (True,): "causal", (False, True): "any mask"}[
                tuple(sorted(values["causal"]))
            ]
            applies = (
                f"{esc(_join(sorted(values['dtype'])))}; head_dim ≤ {esc(_join(sorted(values['head_dim'])))}; {masks}"
            )
            tile = f"**{config.block_m} × {config.block_n}**, {config.num_warps} warps, {config.num_stages} stages"
            extra = ", ".join(f"{k}={v}" for k, v in config.extra)
            if extra:
                tile += f"; {esc(extra)}"
            by_backend[backend].append(
                [
                    f"{code(arch)} {esc(pass_)}",
                    applies,
                    tile,
                    esc(_smem_cell(backend, config, arch, values["dtype"], values["head_dim"], pass_)),
                    f"**{esc(provenance.kind)}**: {esc(_provenance_text(provenance))}",
                ]
            )
        out = []
        for backend, rows in sorted(by_backend.items()):
            out += [
                f".. rubric:: Backend ``{backend}``",
                "",
                list_table(
                    ["GPU, pass", "applies to", "B_r × B_c, warps, stages; other knobs", "shared memory", "provenance"],
                    rows,
                    widths=[12, 18, 26, 12, 32],
                    classes="flash-reasons",
                ),
            ]
        if not out:
            out.append("The configuration table is empty.")
        return self.parse_text_to_nodes("\n".join(out))


class SmemTable(SphinxDirective):
    """The seeds' B_c = floor(M / 4d) next to what the pipelined estimate of flash.heuristics.smem gives."""

    def run(self) -> list[nodes.Node]:
        from flash.heuristics import KernelConfig, smem

        self.env.note_reread()
        seeds = []
        for arch, capacity in smem.MAX_SMEM_PER_BLOCK.items():
            for d in (64, 128, 256):
                b_c = smem.seed_block_columns(capacity, d, 2)
                seeds.append([code(arch), f"{capacity // 1024} KiB", str(d), str(b_c), str(min(b_c, d))])
        out = [
            list_table(
                ["arch", "M (per block)", "d", "B_c = ⌊M / 4d⌋", "B_r = min(B_c, d)"],
                seeds,
                title="The seeds' rule with 2-byte elements (bf16/fp16)",
                classes="flash-numbers",
            ),
        ]
        rows = []
        for d in (64, 128, 256):
            for bm, bn, stages in ((128, 64, 2), (128, 128, 2), (128, 128, 3), (128, 176, 2), (256, 128, 2)):
                config = KernelConfig(block_m=bm, block_n=bn, num_stages=stages)
                cells = []
                for arch in ("sm_80", "sm_86", "sm_90"):
                    b = smem.budget(config, arch, d, 2, "forward")
                    cells.append(f"{b.needed / 1024:.0f} KiB {'✓' if b.fits else '✗'}")
                rows.append([str(d), f"{bm} × {bn}", str(stages), *cells])
        out.append(
            list_table(
                ["d", "B_r × B_c", "stages", "sm_80 (163 KiB)", "sm_86/89 (99 KiB)", "sm_90 (227 KiB)"],
                rows,
                title="Forward estimate of flash.heuristics.smem: Q tile + stages × (K tile + V tile), bf16",
                classes="flash-numbers",
            )
        )
        return self.parse_text_to_nodes("\n".join(out))
