"""``python -m flash check``: a quick self-check of this installation.

Lists the backends with whether they can run here (and why not), then runs one small attention
problem through each usable backend, forward and (where it has one) backward, against the float64
oracle under the tolerance rule of :mod:`flash.testing`. Exit status 1 when a check fails, or when
a backend named with ``--backends`` cannot run.
"""

from __future__ import annotations

import argparse

import torch

import flash
from flash import cli, console
from flash.registry import REGISTRY
from flash.testing import Case, check_backward, check_forward, declared_reasons

#: The problem every backend is checked on: odd lengths, more keys than queries, GQA, causal.
CASE = Case(
    "check", batch=2, seqlen_q=37, seqlen_k=45, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16, causal=True
)
SEED = 0


def _devices(requested: torch.device | None) -> list[torch.device]:
    if requested is not None:
        return [requested]
    return [torch.device("cuda"), torch.device("cpu")] if torch.cuda.is_available() else [torch.device("cpu")]


def check_backend(name: str, devices: list[torch.device]) -> tuple[bool | None, str]:
    """(passed, what happened) for backend ``name``; passed is None when it was not run."""
    reasons = REGISTRY.unavailable_reasons(name)
    if reasons:
        return None, "not run: unusable here"
    rejected: list[str] = []
    for device in devices:
        rejected = declared_reasons(name, CASE, device, "forward")
        if rejected:
            continue
        done = []
        try:
            check_forward(name, CASE, device, seed=SEED)
            done.append("forward ok")
            if declared_reasons(name, CASE, device, "backward"):
                done.append("no backward")
            else:
                check_backward(name, CASE, device, seed=SEED)
                done.append("backward ok")
        except Exception as error:  # a failed check is a result to report, not a crash
            message = str(error).splitlines()[0] if str(error) else ""
            return False, f"on {device}: " + ", ".join([*done, f"FAILED: {type(error).__name__}: {message}"])
        return True, f"on {device}: " + ", ".join(done)
    return None, "not run: cannot run the check problem: " + "; ".join(rejected)


def main(options: argparse.Namespace) -> int:
    """Print the backend list and one check per backend; 0 when every check passed."""
    names = options.backends or [info.name for info in flash.backends()]
    print(console.header(options.device))
    print("backends:")
    print("\n".join(console.backend_lines()))
    dtype = str(CASE.dtype).replace("torch.", "")
    print(
        f"\ncheck: batch {CASE.batch}, seqlen {CASE.seqlen_q}x{CASE.seqlen_k}, heads {CASE.heads_q}/{CASE.heads_kv}, "
        f"head_dim {CASE.head_dim}, {dtype}, causal; against the float64 oracle:"
    )
    failed = passed = 0
    for name in names:
        ok, what = check_backend(name, _devices(options.device))
        print("\n".join(console.wrap(f"  {name:<10} {what}", indent=" " * 13)), flush=True)
        passed += ok is True
        failed += ok is False or (ok is None and options.backends is not None)
    print(f"\n{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``check`` with the command line."""
    parser = commands.add_parser("check", help="check every usable backend against the float64 oracle")
    parser.description = __doc__
    parser.add_argument("--backends", type=cli.backend_list, default=None, help="check only these (comma-separated)")
    parser.add_argument("--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: GPU first)")
    parser.set_defaults(run=main)
