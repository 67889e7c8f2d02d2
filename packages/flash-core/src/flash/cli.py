"""``python -m flash`` (or ``flash``): the command line.

Subcommands: ``demo`` (the default: the main job), ``bench`` (the benchmarks, from the
``flash-bench`` package), ``check`` (a quick self-check of every usable backend); ``--version``.
A bad argument is one line on stderr and exit status 2, never a traceback. The argument types
here (:func:`int_list`, :func:`backend_list`, :func:`device`, :func:`output_file`) and
:class:`Parser` are shared with ``flash-bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import torch

import flash
from flash.registry import ENTRY_POINT_GROUP, REGISTRY

PROG = "python -m flash"
COMMANDS = ("demo", "bench", "check")


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line: ``<prog>: error: <message> (see <prog> --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A request that cannot be honoured as given, found after parsing; reported like a parse error."""


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """A positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``1024,4096``."""
    try:
        values = [positive_int(item) for item in text.split(",") if item.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def choice_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argument type: comma-separated items of ``choices`` (``what`` names one in errors)."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def backend_list(text: str) -> list[str]:
    """Comma-separated names of installed backends."""
    return choice_list(REGISTRY.names(), "backend")(text)


def backend_name(text: str) -> str:
    """One installed backend's name."""
    names = backend_list(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one backend name, got {text!r}")
    return names[0]


def device(text: str) -> torch.device:
    """A torch device that exists here: ``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA device here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"no device {text!r}: {torch.cuda.device_count()} CUDA devices here")
    return dev


def default_device() -> torch.device:
    """The best device present: the first GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def output_file(text: str) -> str:
    """A file that can be written: its folder exists and is writable, and it is not a folder."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name a file to write")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


# ----------------------------------------------------------------------------- --version


def versions() -> list[str]:
    """flash-core's version, then every installed backend's and flash-bench's, then torch's."""
    lines = [f"flash-core {flash.__version__}"]
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = ep.dist
        if dist is not None and dist.name != "flash-core":
            lines.append(f"{dist.name} {dist.version} (backend {ep.name})")
    with contextlib.suppress(metadata.PackageNotFoundError):
        lines.append(f"flash-bench {metadata.version('flash-bench')}")
    lines.append(f"torch {torch.__version__}")
    return lines


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions of flash and its backends")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        print("\n".join(versions()))
        parser.exit(0)


# ----------------------------------------------------------------------------- subcommands


def _bench(argv: list[str]) -> int:
    if importlib.util.find_spec("flash_bench") is None:
        print(
            f"{PROG} bench: the benchmarks live in the flash-bench package, which is not installed; "
            "install it with: pip install ./packages/flash-bench",
            file=sys.stderr,
        )
        return 1
    import flash_bench

    return flash_bench.main(argv)


def build_parser() -> Parser:
    """The parser of ``python -m flash`` (``bench`` is listed here and parsed by flash-bench)."""
    from flash import check, demo

    parser = Parser(prog=PROG, description="flash: exact FlashAttention with interchangeable backends.")
    parser.add_argument("--version", "-V", action=_Version)
    commands = parser.add_subparsers(title="commands", metavar="{demo,bench,check}")
    demo.add_parser(commands)
    commands.add_parser("bench", help="benchmarks against PyTorch's attention (needs flash-bench)", add_help=False)
    check.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; ``demo`` when none is named."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in (*COMMANDS, "-h", "--help", "--version", "-V"):
        args.insert(0, "demo")
    if args[0] == "bench":
        return _bench(args[1:])
    parser = build_parser()
    if args[0] == "demo" and args[1:2] and not args[1].startswith("-"):  # ``python -m flash frob``
        parser.error(f"unknown command {args[1]!r}; choose from {', '.join(COMMANDS)}")
    options = parser.parse_args(args)
    try:
        return int(options.run(options))
    except UsageError as error:
        print(f"{PROG} {args[0]}: error: {error}", file=sys.stderr)
        return 2
