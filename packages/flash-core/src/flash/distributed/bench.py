"""What a ring costs in compute: one rank's attention calls of a zig-zag causal ring, on one GPU.

``python -m flash.distributed.bench`` times, for W ranks' worth of blocks of a ``--tokens``-long
causal sequence, one rank's whole ring (every step's calls and the LSE merges, with a
loopback in place of the communication) against one :func:`flash.attention` call doing the same
number of visible (query, key) pairs: the rank's queries against half the sequence, unmasked.
A ratio near 1 means cutting the work into ring steps costs nothing; communication, which
overlaps the compute on a real ring, is not part of it. "blocks" times the attention calls
alone (no merges), separating the cost of smaller calls from the cost of merging.

Prints a table and writes JSON (``--out``). Runs on the CPU too (small ``--tokens``), as a smoke test.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import flash
from flash import cli, timing
from flash.distributed._blocks import block_backward, block_forward
from flash.distributed._comm import Loopback
from flash.distributed._plan import Block, step_blocks
from flash.distributed._ring import RingAttention, RingConfig
from flash.masking import visible_key_range

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    world: int
    rank: int
    mode: str  # "fwd" or "fwd_bwd"
    tokens: int
    heads: int
    heads_kv: int
    head_dim: int
    calls: int  # attention calls of the rank's whole ring
    ring_ms: float  # every step: calls and merges
    blocks_ms: float  # the calls alone
    one_call_ms: float  # flash.attention on the same number of visible pairs
    ratio: float  # ring_ms / one_call_ms
    ring_tflops: float
    one_call_tflops: float


def _visible_pairs(block: Block) -> int:
    """(query, key) pairs a call computes, by its mask."""
    len_q, len_k = block.rows[1] - block.rows[0], block.cols[1] - block.cols[0]
    bounds = (block.window[0], 0 if block.causal else block.window[1])
    return sum(hi - lo for lo, hi in (visible_key_range(i, len_q, len_k, bounds) for i in range(len_q)))


def _timed(fn: Callable[[], torch.Tensor], mode: str, inputs: tuple[torch.Tensor, ...], device: torch.device) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return timing.measure(fn, device=device)
    dout = torch.randn_like(inputs[0])

    def fwd_bwd() -> object:
        return torch.autograd.grad(fn(), inputs, dout)

    return timing.measure(fwd_bwd, device=device)


def _blocks_only(
    plan: list[tuple[Block, ...]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: RingConfig, mode: str
) -> Callable[[], object]:
    """Every call of the ring, without merges or the ring's bookkeeping."""

    def run() -> object:
        for blocks in plan:
            for block in blocks:
                rows, cols = slice(*block.rows), slice(*block.cols)
                qb, kb, vb = q[:, rows], k[:, cols], v[:, cols]
                out, lse = block_forward(qb, kb, vb, **config.options(block))
                if mode == "fwd_bwd":
                    block_backward(out, qb, kb, vb, out, lse, **config.options(block))
        return None

    return run


def bench_world(
    world: int,
    rank: int,
    tokens: int,
    heads: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype,
    mode: str,
    backend: str,
    device: torch.device,
) -> Row:
    length = tokens // world
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(seqlen: int, h: int) -> torch.Tensor:
        t = torch.randn(1, seqlen, h, head_dim, generator=gen, device=device, dtype=dtype)
        return t.requires_grad_(mode == "fwd_bwd")

    q, k, v = randn(length, heads), randn(length, heads_kv), randn(length, heads_kv)
    config = RingConfig("zigzag", (-1, 0), 0.0, head_dim**-0.5, False, backend)
    ring = Loopback(world, rank)
    plan = [step_blocks(world, rank, (rank - step) % world, "zigzag", length, (-1, 0)) for step in range(world)]
    pairs = sum(_visible_pairs(block) for blocks in plan for block in blocks)

    def ring_call() -> torch.Tensor:
        return RingAttention.apply(q, k, v, "bshd", config, ring)[0]

    ring_ms = _timed(ring_call, mode, (q, k, v), device)
    with torch.no_grad():
        blocks_ms = timing.measure(_blocks_only(plan, q.detach(), k.detach(), v.detach(), config, mode), device=device)
    half_k, half_v = randn(tokens // 2, heads_kv), randn(tokens // 2, heads_kv)

    def one_call() -> torch.Tensor:
        return flash.attention(q, half_k, half_v, backend=backend)

    one_ms = _timed(one_call, mode, (q, half_k, half_v), device)
    one_pairs = length * (tokens // 2)
    flop = 4.0 * heads * head_dim * timing.MODE_FACTORS[mode]
    return Row(
        world=world,
        rank=rank,
        mode=mode,
        tokens=tokens,
        heads=heads,
        heads_kv=heads_kv,
        head_dim=head_dim,
        calls=sum(len(blocks) for blocks in plan),
        ring_ms=ring_ms,
        blocks_ms=blocks_ms,
        one_call_ms=one_ms,
        ratio=ring_ms / one_ms,
        ring_tflops=flop * pairs / ring_ms / 1e9,
        one_call_tflops=flop * one_pairs / one_ms / 1e9,
    )


def table(rows: list[Row]) -> str:
    head = f"{'W':>3} {'rank':>4} {'mode':>7} {'calls':>5} {'ring ms':>9} {'blocks ms':>9} {'1 call ms':>9}"
    head += f" {'ratio':>6} {'ring TF/s':>9} {'1 call TF/s':>11}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.world:>3} {r.rank:>4} {r.mode:>7} {r.calls:>5} {r.ring_ms:>9.3f} {r.blocks_ms:>9.3f} "
            f"{r.one_call_ms:>9.3f} {r.ratio:>6.2f} {r.ring_tflops:>9.4g} {r.one_call_tflops:>11.4g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m flash.distributed.bench``."""
    parser = argparse.ArgumentParser(prog="python -m flash.distributed.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072, help="length of the whole (causal) sequence")
    parser.add_argument("--worlds", default="4,8", help="ranks whose blocks one rank's share is cut into")
    parser.add_argument("--rank", type=int, default=0, help="which rank's calls (zig-zag makes them all equal)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--heads-kv", type=int, default=None, help="K/V heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--backend", default="auto", help="flash backend of the calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="ring-bench.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for world in cli.int_list(args.worlds):
        if args.tokens % (2 * world):
            parser.error(f"--tokens {args.tokens} is not a multiple of 2 x {world} ranks (zig-zag)")
        for mode in args.modes.split(","):
            rows.append(
                bench_world(
                    world, args.rank % world, args.tokens, args.heads, args.heads_kv or args.heads, args.head_dim,
                    DTYPES[args.dtype], mode, args.backend, device,
                )
            )  # fmt: skip
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {
        "environment": timing.environment(),
        "dtype": args.dtype,
        "device": str(device),
        "rows": [asdict(r) for r in rows],
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nresults: {args.out}\n{table(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
