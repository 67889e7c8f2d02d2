"""flash.timing: the timers, the memory probe and the FLOP convention everything measures with."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import flash
from flash import timing

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "results"


def _counting(durations_ms: list[float] | None = None):
    """A function that counts its calls and sleeps the given durations in turn (then none)."""
    calls = []

    def fn() -> None:
        if durations_ms and len(calls) < len(durations_ms):
            time.sleep(durations_ms[len(calls)] / 1e3)
        calls.append(None)

    return fn, calls


def test_measure_is_the_median_of_separately_timed_calls_after_two_untimed():
    # Two untimed calls (warm-up, estimate) take no time; then 1 ms, 60 ms and 3 ms: the median is 3 ms.
    fn, calls = _counting([0, 0, 1, 60, 3])
    ms = timing.measure(fn, device="cpu", warmup_ms=0, budget_ms=0, min_repeats=3)
    assert len(calls) == 5
    assert 2.5 <= ms < 30


def test_measure_sizes_its_repeats_by_the_budget_within_bounds():
    fn, calls = _counting()
    timing.measure(fn, device="cpu", warmup_ms=0, budget_ms=1e6, min_repeats=3, max_repeats=40)
    assert len(calls) == 2 + 40
    slow, slow_calls = _counting([0, 20, 20, 20, 20, 20])  # the second call is the estimate
    timing.measure(slow, device=torch.device("cpu"), warmup_ms=0, budget_ms=1, min_repeats=4)
    assert len(slow_calls) == 2 + 4  # a 1 ms budget still gets min_repeats timed calls


def test_per_call_us_is_wall_time_over_the_calls():
    fn, calls = _counting([0, 0] + [2] * 5)
    us = timing.per_call_us(fn, device="cpu", calls=5, warmup=2)
    assert len(calls) == 7
    assert 2000 <= us < 20000


def test_peak_mib_on_the_cpu_sees_a_temporary_allocation():
    def allocate() -> None:
        block = torch.ones(2**21)  # 8 MiB of float32, freed before returning
        block.add_(1)

    assert 8 <= timing.peak_mib(allocate, device="cpu") < 12


@pytest.mark.parametrize(
    ("sq", "sk", "causal", "pairs"),
    [
        (8, 8, False, 64),
        (8, 8, True, 32),  # exactly half of a square: FlashAttention's convention
        (4, 16, True, 4 * 16 - 4 * 4 / 2),  # bottom-right: the first rows see most keys
        (16, 4, True, 4 * 4 / 2),  # the first 12 rows see no key
        (1, 16, True, 15.5),
    ],
)
def test_visible_pairs(sq, sk, causal, pairs):
    assert timing.visible_pairs(seqlen_q=sq, seqlen_k=sk, causal=causal) == pairs


def test_attention_flops_by_mode():
    shape = {"batch": 2, "heads": 16, "seqlen_q": 8192, "seqlen_k": 8192, "head_dim": 128}
    forward = timing.attention_flops(**shape, causal=False, mode="fwd")
    assert forward == 4 * 2 * 16 * 8192 * 8192 * 128
    assert timing.attention_flops(**shape, causal=True, mode="fwd") == forward / 2
    assert timing.attention_flops(**shape, causal=False, mode="bwd") == 2.5 * forward
    assert timing.attention_flops(**shape, causal=False, mode="fwd_bwd") == 3.5 * forward
    assert timing.tflops(forward, 1.0) == forward / 1e9


def test_convention_shape():
    assert timing.convention_shape(seqlen=8192, head_dim=128) == (2, 16)
    assert timing.convention_shape(seqlen=512, head_dim=64) == (32, 32)
    assert timing.convention_shape(seqlen=32768, head_dim=128) == (1, 16)  # never a batch of 0


def test_the_convention_reproduces_every_committed_gpu_result():
    """The committed TFLOP/s were computed with the convention before it moved here: same numbers."""
    checked = 0
    for path in sorted(RESULTS.glob("*.json")):
        for row in json.loads(path.read_text()).get("rows", []):
            if row.get("ms") is None:
                continue
            flops = timing.attention_flops(
                batch=row["batch"],
                heads=row["heads"],
                seqlen_q=row["seqlen"],
                seqlen_k=row["seqlen"],
                head_dim=row["head_dim"],
                causal=row["causal"],
                mode=row["mode"],
            )
            assert timing.tflops(flops, row["ms"]) == pytest.approx(row["tflops"], rel=1e-12), (path.name, row)
            checked += 1
    assert checked > 100


def test_environment_records_date_and_versions():
    env = timing.environment()
    assert env["date"] and env["torch"] == torch.__version__ and env["python"]
    assert env["flash-core"] == flash.__version__
    assert ("gpu" in env) == torch.cuda.is_available()
