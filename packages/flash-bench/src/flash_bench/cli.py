"""``python -m flash bench``: run the benchmark's sections, write one JSON file, print a summary.

On a GPU the ``attention`` and ``overhead`` sections run by default, on the CPU ``cpu`` and
``overhead``; ``--sections`` names others. The JSON file holds ``environment`` (GPU, date,
versions), ``sections`` (what ran) and each section's own keys; it is written again after every
section, so an interrupted run keeps what it measured. Every argument, ``--out`` included, is
checked before any measurement starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from flash import cli, console, timing
from flash_bench.sections import SECTIONS, defaults


def build_parser(prog: str) -> cli.Parser:
    """The options shared by every section, then each section's own."""
    parser = cli.Parser(
        prog=prog, description="flash's benchmarks: run sections, write one JSON file, print a summary."
    )
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--sections",
        type=cli.choice_list(list(SECTIONS), "section"),
        default=None,
        help=f"comma-separated, from {', '.join(SECTIONS)} (default: the device's own)",
    )
    common.add_argument(
        "--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: the best present)"
    )
    common.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is present")
    common.add_argument(
        "--out",
        type=cli.output_file,
        default="flash-bench.json",
        help="the JSON results file (default: flash-bench.json)",
    )
    common.add_argument(
        "--backends",
        type=cli.backend_list,
        default=None,
        help="flash backends to time (default: every usable one; attention leaves out reference)",
    )
    common.add_argument("--seqlens", type=cli.int_list, default=None, help="sequence lengths (default: per section)")
    for section in SECTIONS.values():
        section.add_arguments(parser.add_argument_group(f"section {section.name}", section.help))
    return parser


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the previous file or the new one."""
    folder = Path(path).parent
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=1)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None, *, prog: str = "python -m flash bench") -> int:
    """Run the sections the arguments name; 0 once every section has written its results."""
    parser = build_parser(prog)
    options = parser.parse_args(argv)
    device = torch.device("cpu") if options.cpu else options.device or cli.default_device()
    names = options.sections or defaults(device)
    for name in names:
        if device.type not in SECTIONS[name].devices:
            parser.error(f"section {name!r} measures on {' or '.join(SECTIONS[name].devices)}, not on {device.type}")
    print(console.header(device))
    result: dict[str, Any] = {"environment": timing.environment(), "sections": names}
    summaries = []
    for name in names:
        section = SECTIONS[name]
        print(f"\n== {name}: {section.help}", flush=True)
        report = section.run(options, device)
        result.update(report.results)
        summaries.append(report.summary)
        write_json(options.out, result)
    print(f"\nresults: {options.out}\n\n" + "\n\n".join(summaries))
    return 0
