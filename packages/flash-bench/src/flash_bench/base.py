"""The shape of a benchmark section, and what it hands back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Protocol

import torch


def timed_line(what: str, ms: float | None, tflops: float | None, max_error: float | None, note: str) -> str:
    """One progress line of a timed case: ``what``, then its time and TFLOP/s (or why it failed)."""
    if ms is None or tflops is None:
        return f"{what} failed: {note}"
    error = f"  err {max_error:.2e}" if max_error is not None else ""
    return f"{what} {ms:8.3f} ms {tflops:7.1f} TFLOP/s{error}"


def failure(error: Exception) -> str:
    """One line for a measurement that could not be made: the error's type and first line."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


@dataclass
class Report:
    """What a section measured: keys of the results JSON, and a text summary to print at the end."""

    results: dict[str, Any]
    summary: str


class Section(Protocol):
    """One named part of the benchmark."""

    #: The name on the command line (``--sections NAME``).
    name: str
    #: One line for ``--help``.
    help: str
    #: Device types it measures on; see :func:`flash_bench.sections.defaults`.
    devices: tuple[str, ...]
    #: Whether it runs when no ``--sections`` are named (on a device it supports).
    default: bool

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add this section's own options (named so that they cannot clash with another's)."""

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        """Measure, printing progress as it goes."""
        ...
