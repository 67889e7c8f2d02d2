"""Plain-text output of the command line: a header line, the backend list, rows that fit
:data:`WIDTH` columns (wrapped, never cut, so an error message stays whole)."""

from __future__ import annotations

import textwrap

import torch

import flash

#: Columns every line of the command line's output fits in.
WIDTH = 100


def wrap(text: str, *, indent: str = "", width: int = WIDTH) -> list[str]:
    """``text`` as lines of at most ``width`` columns, continuation lines indented by ``indent``."""
    return textwrap.wrap(text, width=width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def header(device: torch.device | None = None) -> str:
    """The first line of every command: versions, and the device when there is one."""
    line = f"flash {flash.__version__} | torch {torch.__version__}"
    if device is not None:
        line += f" | device {device}"
        if device.type == "cuda":
            line += f" ({torch.cuda.get_device_name(device)})"
    return line


def backend_lines() -> list[str]:
    """One row per installed backend (name, priority, package, usable or why not), with a header row."""
    lines = [f"  {'backend':<10} {'priority':>8}  {'package':<22} status"]
    for info in flash.backends():
        package = f"{info.distribution or 'in-process'} {info.version or ''}".strip()
        priority = "-" if info.priority is None else str(info.priority)
        status = "usable" if info.usable else "unusable: " + "; ".join(info.reasons)
        row = f"  {info.name:<10} {priority:>8}  {package:<22} {status}"
        lines += wrap(row, indent=" " * 46)
    return lines
