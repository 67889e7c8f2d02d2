"""Mask tables and tiling pictures drawn from :mod:`flash.masking` (the definition every backend follows)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import code, figure, list_table, write_if_changed

UNBOUNDED = -1


def _bounds(causal: bool, window: tuple[int, int] | None) -> tuple[int, int]:
    left, right = window if window is not None else (UNBOUNDED, UNBOUNDED)
    return (left, 0 if causal else right)


def _window_option(text: str) -> tuple[int, int]:
    left, right = (int(x) for x in text.replace(",", " ").split())
    return left, right


def describe(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int] | None, sink_tokens: int = 0) -> str:
    parts = [f"seqlen_q={seqlen_q}", f"seqlen_k={seqlen_k}"]
    if causal:
        parts.append("causal=True")
    if window is not None:
        parts.append(f"window={window}")
    if sink_tokens:
        parts.append(f"sink_tokens={sink_tokens}")
    return ", ".join(parts)


def _runs(seen: list[bool]) -> str:
    """The keys a row sees as ranges: ``0 … 1, 4 … 6``."""
    runs, start = [], None
    for j, flag in enumerate([*seen, False]):
        if flag and start is None:
            start = j
        elif not flag and start is not None:
            runs.append(f"{start}" if j - start == 1 else f"{start} … {j - 1}")
            start = None
    return ", ".join(runs) or "none: output 0, LSE −∞"


class MaskDirective(SphinxDirective):
    """Which keys each query row sees: a grid computed by :func:`flash.masking.tile_mask`."""

    option_spec: ClassVar[dict] = {
        "seqlen-q": directives.positive_int,
        "seqlen-k": directives.positive_int,
        "causal": directives.flag,
        "window": _window_option,
        "sink-tokens": directives.nonnegative_int,
        "caption": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        from flash.masking import tile_mask

        self.env.note_reread()
        len_q = self.options.get("seqlen-q", 4)
        len_k = self.options.get("seqlen-k", 4)
        causal = "causal" in self.options
        window = self.options.get("window")
        sinks = self.options.get("sink-tokens", 0)
        mask = tile_mask((0, len_q), (0, len_k), len_q, len_k, _bounds(causal, window), "cpu", sinks).tolist()
        rows = [[f"**{i}**", *["■" if x else "·" for x in seen], _runs(seen)] for i, seen in enumerate(mask)]
        title = self.options.get("caption") or code(describe(len_q, len_k, causal, window, sinks))
        table = list_table(
            ["query"] + [f"k{j}" for j in range(len_k)] + ["keys seen"],
            rows,
            title=title,
            classes="flash-mask",
        )
        return self.parse_text_to_nodes(table)


def _panel_spec(text: str) -> tuple[str, bool, tuple[int, int] | None]:
    text = text.strip()
    if text == "full":
        return "no mask", False, None
    if text == "causal":
        return "causal", True, None
    if text.startswith("window"):
        left, right = _window_option(text[len("window") :])
        return f"window ({left}, {right})", False, (left, right)
    raise ValueError(f"flash-tiling-figure: unknown panel {text!r} (full, causal, window L R)")


def draw_tiling(path: Path, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int, panels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

    from flash.masking import Tile, classify_tile, visible_key_range

    colours = {Tile.VISIBLE: "#4c78a8", Tile.PARTIAL: "#f58518", Tile.HIDDEN: "#e8e8e8"}
    specs = [_panel_spec(p) for p in panels]
    fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 4.6), squeeze=False)
    for ax, (label, causal, window) in zip(axes[0], specs):
        bounds = _bounds(causal, window)
        skipped = 0
        for i0 in range(0, seqlen_q, block_q):
            i1 = min(i0 + block_q, seqlen_q)
            for j0 in range(0, seqlen_k, block_k):
                j1 = min(j0 + block_k, seqlen_k)
                kind = (
                    Tile.VISIBLE
                    if bounds == (UNBOUNDED, UNBOUNDED)
                    else classify_tile((i0, i1), (j0, j1), seqlen_q, seqlen_k, bounds)
                )
                skipped += kind is Tile.HIDDEN
                ax.add_patch(
                    Rectangle(
                        (j0, i0),
                        j1 - j0,
                        i1 - i0,
                        facecolor=colours[kind],
                        alpha=0.35,
                        edgecolor="#333333",
                        linewidth=1.2,
                    )
                )
        for i in range(seqlen_q):  # the elements each row sees
            lo, hi = visible_key_range(i, seqlen_q, seqlen_k, bounds)
            for j in range(lo, hi):
                ax.add_patch(Rectangle((j + 0.2, i + 0.2), 0.6, 0.6, facecolor="#1f3b57", linewidth=0))
        for index, i0 in enumerate(range(0, seqlen_q, block_q)):  # one program per query block
            y = i0 + min(block_q, seqlen_q - i0) / 2
            ax.add_patch(
                FancyArrowPatch(
                    (-0.6, y),
                    (seqlen_k + 0.4, y),
                    arrowstyle="-|>",
                    mutation_scale=10,
                    color="#b4451f",
                    alpha=0.55,
                    linewidth=1.0,
                )
            )
            ax.text(-0.9, y, f"$Q_{{{index + 1}}}$", ha="right", va="center", fontsize=9)
        for index, j0 in enumerate(range(0, seqlen_k, block_k)):
            ax.text(
                j0 + min(block_k, seqlen_k - j0) / 2,
                -0.6,
                f"$K_{{{index + 1}}}V_{{{index + 1}}}$",
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_xlim(-3.2, seqlen_k + 0.6)
        ax.set_ylim(seqlen_q + 0.3, -2.0)
        ax.set_aspect("equal")
        ax.axis("off")
        tiles = -(-seqlen_q // block_q) * -(-seqlen_k // block_k)
        ax.set_title(f"{label}: {tiles - skipped} of {tiles} tiles computed", fontsize=10)
    fig.legend(
        handles=[
            Patch(facecolor=colours[Tile.VISIBLE], alpha=0.35, edgecolor="#333", label="tile computed, no mask"),
            Patch(facecolor=colours[Tile.PARTIAL], alpha=0.35, edgecolor="#333", label="tile computed, then masked"),
            Patch(facecolor=colours[Tile.HIDDEN], alpha=0.35, edgecolor="#333", label="tile skipped"),
            Patch(facecolor="#1f3b57", label="score the query sees"),
        ],
        loc="lower center",
        ncol=4,
        fontsize=8.5,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    write_if_changed(path, buffer.getvalue())


class TilingFigure(SphinxDirective):
    """A picture of the tiles of the score matrix; the content is the caption."""

    required_arguments = 1  # the image's file name (without .png)
    has_content = True
    option_spec: ClassVar[dict] = {
        "seqlen-q": directives.positive_int,
        "seqlen-k": directives.positive_int,
        "block-q": directives.positive_int,
        "block-k": directives.positive_int,
        "panels": directives.unchanged,
        "alt": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()
        name = self.arguments[0]
        path = Path(self.env.srcdir) / "_generated" / f"{name}.png"
        draw_tiling(
            path,
            self.options.get("seqlen-q", 12),
            self.options.get("seqlen-k", 12),
            self.options.get("block-q", 4),
            self.options.get("block-k", 4),
            [p for p in self.options.get("panels", "full,causal").split(",") if p.strip()],
        )
        caption = "\n".join(self.content)
        return self.parse_text_to_nodes(
            figure(f"/_generated/{name}.png", caption, alt=" ".join(self.options.get("alt", "tiling diagram").split()))
        )
