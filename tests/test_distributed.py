"""Ring attention (flash.distributed): 2 and 4 CPU ranks over gloo, and the GPU tier over NCCL.

Each rank draws the same full-sequence inputs, runs the ring on its shard and holds its shard of
the output, LSE and gradients to the tolerance rule against the float64 oracle of the whole
sequence.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist

from flash.distributed import (
    SHARDINGS,
    Sharding,
    positions,
    positions_varlen,
    ring_attention,
    ring_attention_varlen,
    shard,
    shard_varlen,
    unshard,
    unshard_varlen,
)
from flash.distributed._plan import step_blocks
from flash.errors import InvalidInputError
from flash.masking import tile_mask
from flash.spec import build_spec
from flash.testing import assert_within_rule, dense_attention, naive_dtype
from tests.ranks import RankPool

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RingCase:
    name: str
    world: int
    seqlen: int  # the full sequence
    sharding: Sharding = "zigzag"
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 24
    dtype: torch.dtype = torch.float32
    layout: Literal["bshd", "bhsd"] = "bshd"
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    scale: float | None = None

    def options(self) -> dict[str, Any]:
        return {
            "causal": self.causal,
            "window": self.window,
            "softcap": self.softcap,
            "scale": self.scale,
            "layout": self.layout,
        }

    @property
    def seq_dim(self) -> int:
        return 1 if self.layout == "bshd" else 2


# Lengths are the smallest the sharding allows times an odd chunk, so chunks are odd-sized.
CASES = [
    RingCase("zigzag_causal_gqa", world=2, seqlen=44, causal=True),
    RingCase("zigzag_full_f64_d17", world=2, seqlen=36, dtype=torch.float64, head_dim=17, heads_q=3, heads_kv=3),
    RingCase("contiguous_causal_odd_shard", world=2, seqlen=46, sharding="contiguous", causal=True),
    RingCase("zigzag_window_softcap", world=2, seqlen=52, window=(5, 3), softcap=3.0),
    RingCase("contiguous_causal_window", world=2, seqlen=38, sharding="contiguous", causal=True, window=(7, 0)),
    RingCase("zigzag_bhsd_mqa", world=2, seqlen=28, layout="bhsd", heads_kv=1, causal=True, scale=0.3),
    RingCase("zigzag_causal_bf16", world=2, seqlen=60, dtype=torch.bfloat16, causal=True, head_dim=32),
    RingCase("zigzag4_causal_gqa", world=4, seqlen=56, causal=True, heads_q=6, heads_kv=2, head_dim=20),
    RingCase("contiguous4_full_f64", world=4, seqlen=36, sharding="contiguous", dtype=torch.float64, head_dim=9),
    RingCase("zigzag4_window_spans_chunks", world=4, seqlen=56, window=(9, 2), softcap=2.0),
    RingCase("contiguous4_causal_window", world=4, seqlen=44, sharding="contiguous", causal=True, window=(13, -1)),
    RingCase("zigzag4_right_window", world=4, seqlen=40, window=(-1, 6), heads_kv=4, layout="bhsd"),
]


# --------------------------------------------------------------------------- run on every rank


def _inputs(case: RingCase, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Full-sequence q, k, v, dout: the same on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(heads: int) -> torch.Tensor:
        shape = (case.batch, case.seqlen, heads, case.head_dim)
        if case.layout == "bhsd":
            shape = (case.batch, heads, case.seqlen, case.head_dim)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=case.dtype)

    return draw(case.heads_q), draw(case.heads_kv), draw(case.heads_kv), draw(case.heads_q)


def _dense(case: RingCase, q, k, v, dout, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Out, LSE, dq, dk, dv of the whole sequence, computed densely in ``dtype``."""
    spec = build_spec(q, k, v, **case.options())
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dense_attention(spec, *inputs, compute_dtype=dtype)
    grads = torch.autograd.grad(out, inputs, dout.to(dtype))
    return (out.detach(), lse.detach(), *grads)


def _ring(case: RingCase, q, k, v, dout, backend: str, deterministic: bool = False) -> tuple[torch.Tensor, ...]:
    """This rank's out, LSE, dq, dk, dv through the ring."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cut = [shard(t, world, rank, dim=case.seq_dim, sharding=case.sharding) for t in (q, k, v, dout)]
    inputs = [t.requires_grad_() for t in cut[:3]]
    out, lse = ring_attention(
        *inputs,
        return_lse=True,
        sharding=case.sharding,
        backend=backend,
        deterministic=deterministic,
        **case.options(),
    )
    grads = torch.autograd.grad(out, inputs, cut[3])
    return (out.detach(), lse, *grads)


def check_ring(case: RingCase, seed: int, device: str = "cpu", backend: str = "reference") -> None:
    """Output, LSE and gradients of this rank's shard within the rule of the float64 oracle."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == case.world
    q, k, v, dout = _inputs(case, seed, device)
    oracle = _dense(case, q, k, v, dout, torch.float64)
    naive = _dense(case, q, k, v, dout, naive_dtype(case.dtype))
    got = _ring(case, q, k, v, dout, backend)
    names = ("out", "lse", "dq", "dk", "dv")
    for index, (name, actual, exact, rough) in enumerate(zip(names, got, oracle, naive)):
        dim = 2 if name == "lse" else case.seq_dim  # the LSE is (batch, heads, seqlen) in both layouts
        expected_dtype = (torch.float64 if case.dtype == torch.float64 else torch.float32) if index == 1 else case.dtype
        assert actual.dtype == expected_dtype, f"{name}: dtype {actual.dtype}"
        exact_cut, rough_cut = (shard(t, world, rank, dim=dim, sharding=case.sharding) for t in (exact, rough))
        assert_within_rule(f"{case.name} rank {rank} {name} (seed {seed})", actual, exact_cut, rough_cut, case.dtype)


def check_deterministic(case: RingCase, seed: int, device: str = "cpu", backend: str = "reference") -> None:
    """Two deterministic runs agree bit for bit."""
    q, k, v, dout = _inputs(case, seed, device)
    first = _ring(case, q, k, v, dout, backend, deterministic=True)
    second = _ring(case, q, k, v, dout, backend, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{case.name}: {name} differs between two deterministic runs"


def check_unshard(seed: int) -> None:
    """unshard inverts shard on every dim and both shardings; positions are the shard of arange."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4 * world, 5, generator=gen)
    for sharding in ("zigzag", "contiguous"):
        for dim in (1, -2):
            piece = shard(x, world, rank, dim=dim, sharding=sharding)
            assert piece.shape[1] == 4, piece.shape
            assert torch.equal(unshard(piece, dim=dim, sharding=sharding), x)
        ids = positions(4 * world, world, rank, sharding=sharding)
        assert torch.equal(ids, shard(torch.arange(4 * world), world, rank, dim=0, sharding=sharding))
        assert torch.equal(x[:, ids], shard(x, world, rank, dim=1, sharding=sharding))


def run_example(steps: int) -> list[float]:
    """examples/ring_attention_train.py's loop on this rank (the script itself spawns the ranks)."""
    spec = importlib.util.spec_from_file_location("ring_attention_train", REPO / "examples" / "ring_attention_train.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.train(steps, check=True, backend="reference")


def check_odd_shard_refused() -> str:
    """Every rank refuses an odd zig-zag shard before communicating (so the pool stays in step)."""
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(InvalidInputError) as caught:
        ring_attention(q, q, q, causal=True)
    return caught.value.argument


@dataclass(frozen=True)
class VarlenCase:
    name: str
    world: int
    lengths: tuple[int, ...]  # of the packed sequences, multiples of the number of chunks
    sharding: Sharding = "zigzag"
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 24
    dtype: torch.dtype = torch.float32
    causal: bool = False
    softcap: float = 0.0


VARLEN_CASES = [
    VarlenCase("varlen_zigzag_causal_gqa", world=2, lengths=(8, 0, 20, 4), causal=True),
    VarlenCase("varlen_contiguous_softcap", world=2, lengths=(6, 14, 2), sharding="contiguous", softcap=2.0),
    VarlenCase("varlen4_zigzag_causal", world=4, lengths=(16, 8, 24), causal=True, heads_q=6, heads_kv=3),
    VarlenCase("varlen4_contiguous_f64", world=4, lengths=(4, 12), sharding="contiguous", dtype=torch.float64),
]


def check_ring_varlen(case: VarlenCase, seed: int, device: str = "cpu", backend: str = "reference") -> None:
    """A packed batch, every sequence sharded: this rank's tokens within the rule of the oracle."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cu = torch.tensor([0, *itertools.accumulate(case.lengths)], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(seed)
    total = sum(case.lengths)
    q, k, v, dout = (
        torch.randn(total, heads, case.head_dim, generator=gen, dtype=torch.float64).to(device, case.dtype)
        for heads in (case.heads_q, case.heads_kv, case.heads_kv, case.heads_q)
    )
    options: dict[str, Any] = {"causal": case.causal, "softcap": case.softcap}
    spec = build_spec(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **options)

    def dense(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = dense_attention(spec, *inputs, compute_dtype=dtype, cu_seqlens_q=cu, cu_seqlens_k=cu)
        return (out.detach(), lse.detach(), *torch.autograd.grad(out, inputs, dout.to(dtype)))

    def cut(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return shard_varlen(t, cu, world, rank, dim=dim, sharding=case.sharding)

    inputs = [cut(t).requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention_varlen(
        inputs[0], inputs[1], inputs[2], cu, return_lse=True, sharding=case.sharding, backend=backend, **options
    )
    got = (out.detach(), lse, *torch.autograd.grad(out, inputs, cut(dout)))
    for name, actual, exact, rough in zip(
        ("out", "lse", "dq", "dk", "dv"), got, dense(torch.float64), dense(case.dtype)
    ):
        dim = 1 if name == "lse" else 0  # the LSE of a packed batch is (heads, tokens)
        where = f"{case.name} rank {rank} {name} (seed {seed})"
        assert_within_rule(where, actual, cut(exact, dim), cut(rough, dim), case.dtype)
    assert torch.equal(unshard_varlen(inputs[0].detach(), cu, sharding=case.sharding), q)
    starts = cu[:-1].long().repeat_interleave(torch.tensor(case.lengths, device=device))
    expected = cut(torch.arange(total, device=device) - starts)
    assert torch.equal(positions_varlen(cu, world, rank, sharding=case.sharding), expected)


def check_varlen_refusals() -> list[str]:
    """Packed batches that cannot be sharded are refused, naming the argument, before communicating."""
    world = dist.get_world_size()
    q = torch.randn(8, 2, 16)
    good = torch.tensor([0, 8 * world], dtype=torch.int32)
    calls: list[tuple[Any, torch.Tensor, dict[str, Any]]] = [
        (q, torch.tensor([0, world, 8 * world], dtype=torch.int32), {}),  # a sequence of W tokens: not 2W
        (q, torch.tensor([0, 4 * world], dtype=torch.int32), {}),  # offsets for half of q's tokens
        (q, good, {"max_seqlen": 4}),
        (q, good.float(), {}),
        (q.unsqueeze(0), good, {}),  # not packed
        (q, good.long(), {}),
        (q, good, {"max_seqlen": 2.5}),
    ]
    names = []
    for tensor, cu, options in calls:
        with pytest.raises(InvalidInputError) as caught:
            ring_attention_varlen(tensor, tensor, tensor, cu, **options)
        names.append(caught.value.argument)
    with pytest.raises(InvalidInputError) as caught:
        ring_attention_varlen(q, q[:4], q[:4], good)
    return [*names, caught.value.argument]


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def pools() -> Iterator[Callable[[int], RankPool]]:
    """Rank pools by world size, started on first use and shared by the module's tests."""
    made: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world in made and made[world].broken:
            made.pop(world).close()
        if world not in made:
            made[world] = RankPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_matches_oracle(pools, case: RingCase, seed: int) -> None:
    pools(case.world).run(check_ring, case, seed)


@pytest.mark.parametrize("world", [2, 4])
def test_deterministic_bit_identical(pools, world: int, seed: int) -> None:
    case = RingCase("deterministic", world=world, seqlen=8 * world, causal=True, window=(5, 0), softcap=1.5)
    pools(world).run(check_deterministic, case, seed)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c.name)
def test_ring_varlen_matches_oracle(pools, case: VarlenCase, seed: int) -> None:
    pools(case.world).run(check_ring_varlen, case, seed)


def test_varlen_refusals(pools) -> None:
    names = pools(2).run(check_varlen_refusals)
    expected = ["cu_seqlens", "cu_seqlens", "max_seqlen", "cu_seqlens", "q", "cu_seqlens", "max_seqlen", "k"]
    assert names[0] == expected, names[0]


def test_unshard_and_positions(pools, seed: int) -> None:
    pools(4).run(check_unshard, seed)


def test_odd_zigzag_shard_refused_on_every_rank(pools) -> None:
    assert pools(2).run(check_odd_shard_refused) == ["q", "q"]


def _visibility(
    world: int, rank: int, source: int, sharding: Sharding, length: int, bounds: tuple[int, int]
) -> torch.Tensor:
    """Dense (length, length) mask of the rank's queries against the source's keys, by global position."""
    rows = shard(torch.arange(world * length), world, rank, dim=0, sharding=sharding)
    cols = shard(torch.arange(world * length), world, source, dim=0, sharding=sharding)
    left, right = bounds
    diff = cols[None, :] - rows[:, None]
    seen = torch.ones(length, length, dtype=torch.bool)
    if left != -1:
        seen &= diff >= -left
    if right != -1:
        seen &= diff <= right
    return seen


def test_plan_covers_exactly_the_visible_pairs(seed: int) -> None:
    """The calls of every step tile exactly the pairs the global mask shows, each with its own window."""
    rng = random.Random(seed)
    for _ in range(300):
        world, sharding = rng.choice([1, 2, 3, 4, 8]), rng.choice(SHARDINGS)
        length = rng.randint(1, 9) * (2 if sharding == "zigzag" else 1)
        bounds = (rng.choice([-1, *range(0, 3 * length)]), rng.choice([-1, 0, *range(0, 3 * length)]))
        rank, source = rng.randrange(world), rng.randrange(world)
        covered = torch.zeros(length, length, dtype=torch.int64)
        for block in step_blocks(world, rank, source, sharding, length, bounds):
            (r0, r1), (c0, c1) = block.rows, block.cols
            assert r0 < r1 and c0 < c1, block
            causal, window = block.options
            spec = build_spec(torch.ones(1, r1 - r0, 1, 1), torch.ones(1, c1 - c0, 1, 1), torch.ones(1, c1 - c0, 1, 1),
                              causal=causal, window=window)  # fmt: skip
            mask = tile_mask((0, r1 - r0), (0, c1 - c0), r1 - r0, c1 - c0, spec.mask_bounds, torch.device("cpu"))
            covered[r0:r1, c0:c1] += 1 + mask.long()  # 1 for "inside a call", 2 for "seen by that call"
        expected = _visibility(world, rank, source, sharding, length, bounds)
        where = f"world {world} rank {rank} source {source} {sharding} length {length} bounds {bounds}"
        assert (covered <= 2).all(), f"{where}: calls overlap"
        assert torch.equal(covered == 2, expected), f"{where}: calls see other pairs than the mask"


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_causal_is_one_balanced_call_per_step(world: int) -> None:
    length = 2 * 5
    work = []
    for rank in range(world):
        pairs = 0
        for step in range(world):
            blocks = step_blocks(world, rank, (rank - step) % world, "zigzag", length, (-1, 0))
            assert len(blocks) == 1, (rank, step, blocks)
            pairs += int(_visibility(world, rank, (rank - step) % world, "zigzag", length, (-1, 0)).sum())
        work.append(pairs)
    assert len(set(work)) == 1, f"visible pairs per rank {work}: zig-zag should balance causal work"


def test_contiguous_causal_is_unbalanced() -> None:
    """The reason zig-zag exists: with contiguous shards the last rank does most of the causal work."""
    world, length = 4, 6
    work = [
        sum(int(_visibility(world, r, s, "contiguous", length, (-1, 0)).sum()) for s in range(world))
        for r in range(world)
    ]
    assert work == sorted(work) and work[-1] > 3 * work[0], work


def test_invalid_inputs_name_the_argument() -> None:
    q = torch.randn(1, 8, 2, 16)
    cases: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, str]] = [
        ({"sharding": "striped"}, q, q, "sharding"),
        ({}, q, torch.randn(1, 6, 2, 16), "k"),
        ({"window": (2,)}, q, q, "window"),
        ({"causal": 1}, q, q, "causal"),
        ({}, q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), "q"),
        ({}, q, q, "group"),  # valid call, but this process has no process group
    ]
    for options, qq, kv, argument in cases:
        with pytest.raises(InvalidInputError) as caught:
            ring_attention(qq, kv, kv, **options)
        assert caught.value.argument == argument, (options, caught.value)


def test_shard_refuses_lengths_that_do_not_divide() -> None:
    x = torch.randn(2, 12, 3)
    with pytest.raises(InvalidInputError, match="multiple of 8") as caught:
        shard(x, 4, 0, sharding="zigzag")
    assert caught.value.argument == "x"
    assert shard(x, 4, 3, sharding="contiguous").shape == (2, 3, 3)
    with pytest.raises(InvalidInputError) as caught:
        shard(x, 4, 4)
    assert caught.value.argument == "rank"
    with pytest.raises(InvalidInputError) as caught:
        shard(x, 2, 0, dim=3)
    assert caught.value.argument == "dim"


def test_shard_is_differentiable() -> None:
    x = torch.randn(2, 8, 3, requires_grad=True)
    (shard(x, 2, 1) * 2).sum().backward()
    expected = torch.zeros(2, 8, 3)
    expected[:, 2:4] = expected[:, 4:6] = 2  # zig-zag rank 1 of 2 holds chunks 1 and 2 of 4
    assert x.grad is not None and torch.equal(x.grad, expected)


def test_import_flash_does_not_import_distributed() -> None:
    code = "import sys, flash; assert 'flash.distributed' not in sys.modules; flash.distributed.ring_attention"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_example_training_steps(pools) -> None:
    """The example's training loop on 2 gloo ranks: its first step equals the unsharded model's
    (it checks loss and gradients itself and raises otherwise), and the loss goes down."""
    losses = pools(2).run(run_example, 8)
    assert losses[0] == losses[1], "every rank reports the same (all-reduced) loss"
    assert losses[0][-1] < losses[0][0], losses[0]


def test_bench_smoke(tmp_path: Path) -> None:
    """The single-GPU ring benchmark runs (here on the CPU, tiny) and writes its JSON."""
    from flash.distributed import bench

    out = tmp_path / "ring.json"
    argv = ["--tokens", "32", "--worlds", "2", "--heads", "1", "--head-dim", "8", "--dtype", "fp32"]
    assert bench.main([*argv, "--backend", "reference", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["mode"], r["calls"]) for r in rows] == [(2, "fwd", 2), (2, "fwd_bwd", 2)]
    assert all(r["ring_ms"] > 0 and r["one_call_ms"] > 0 for r in rows)


# --------------------------------------------------------------------------- GPU tier


GPU_CASES = [
    RingCase("gpu_zigzag_causal", world=2, seqlen=4096, batch=1, heads_q=8, heads_kv=8, head_dim=128,
             dtype=torch.bfloat16, causal=True),
    RingCase("gpu_zigzag_gqa_fp16", world=2, seqlen=2052, batch=2, heads_q=8, heads_kv=2, head_dim=64,
             dtype=torch.float16, causal=True),
    RingCase("gpu_contiguous_full", world=2, seqlen=2000, batch=1, heads_q=4, heads_kv=4, head_dim=128,
             dtype=torch.bfloat16, sharding="contiguous"),
    RingCase("gpu_zigzag_window_softcap", world=2, seqlen=4096, batch=1, heads_q=4, heads_kv=2, head_dim=128,
             dtype=torch.bfloat16, window=(700, 0), softcap=30.0),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ring_nccl(seed: int) -> None:
    world = min(torch.cuda.device_count(), 4)
    pool = RankPool(world, backend="nccl")
    try:
        for case in GPU_CASES:
            scaled = replace(case, world=world, seqlen=case.seqlen // 2 * world)  # still a multiple of 2W
            pool.run(check_ring, scaled, seed, "cuda", "auto")
            pool.run(check_deterministic, scaled, seed, "cuda", "auto")
        chunks = 2 * world  # every sequence a multiple of 2W: lengths from 1 to 700 chunks
        lengths = tuple(chunks * n for n in (1, 700, 37, 0, 256))
        packed = VarlenCase("gpu_varlen_causal", world, lengths, heads_q=8, heads_kv=2, head_dim=128,
                            dtype=torch.bfloat16, causal=True)  # fmt: skip
        pool.run(check_ring_varlen, packed, seed, "cuda", "auto")
    finally:
        pool.close()
