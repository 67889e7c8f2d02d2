"""Small helpers to emit reStructuredText from the directives (parsed back by Sphinx)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

_SPECIAL = re.compile(r"([\\*`|_\[\]<>])")


def esc(text: object) -> str:
    """``text`` as literal reST inline text (markup characters escaped)."""
    return _SPECIAL.sub(r"\\\1", str(text))


def code(text: object) -> str:
    """``text`` as inline literal."""
    t = str(text).replace("`", "'")
    return f"``{t}``" if t else ""


def list_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    title: str = "",
    widths: Sequence[int] | str | None = None,
    classes: str = "",
    header_columns: int = 0,
) -> str:
    """A ``list-table`` directive; cells are reST text (escape them with :func:`esc` first)."""
    lines = [f".. list-table:: {title}".rstrip(), "   :header-rows: 1"]
    if header_columns:
        lines.append(f"   :stub-columns: {header_columns}")
    if widths:
        lines.append(f"   :widths: {widths if isinstance(widths, str) else ' '.join(map(str, widths))}")
    if classes:
        lines.append(f"   :class: {classes}")
    lines.append("")
    for row in [list(headers)] + [list(r) for r in rows]:
        for index, cell in enumerate(row):
            bullet = "   * - " if index == 0 else "     - "
            cell_lines = str(cell).split("\n") if str(cell) else [""]
            lines.append(bullet + cell_lines[0])
            lines.extend("       " + extra for extra in cell_lines[1:])
    lines.append("")
    return "\n".join(lines)


def figure(uri: str, caption: str = "", alt: str = "", width: str = "") -> str:
    lines = [f".. figure:: {uri}"]
    if alt:
        lines.append(f"   :alt: {' '.join(alt.split())}")
    if width:
        lines.append(f"   :width: {width}")
    lines.append("")
    if caption:
        lines.extend("   " + line for line in caption.split("\n"))
    lines.append("")
    return "\n".join(lines)


def admonition(kind: str, body: str) -> str:
    return f".. {kind}::\n\n" + "\n".join("   " + line if line else "" for line in body.split("\n")) + "\n"


def write_if_changed(path: Path, data: bytes | str) -> None:
    """Write ``data`` unless the file already holds it (keeps incremental builds incremental)."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == raw:
        return
    path.write_bytes(raw)
