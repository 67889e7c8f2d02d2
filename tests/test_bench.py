"""flash-bench: the sections that run without a GPU, the results file, the tables."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

import flash
from flash.reference.naive import naive_attention
from flash_bench import cli
from flash_bench.base import Report
from flash_bench.sections import SECTIONS, attention, defaults, fp8, overhead


def test_cpu_and_overhead_sections_write_json_with_environment(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--cpu", "--sections", "cpu,overhead", "--seqlens", "128,256", "--overhead-calls", "5"]
    result = subprocess.run(
        [sys.executable, "-m", "flash", "bench", *args, "--backends", "reference", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert max(map(len, result.stdout.splitlines())) <= 100
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["environment"]["date"]
    assert data["sections"] == ["cpu", "overhead"]

    rows = data["cpu"]
    assert [r["seqlen"] for r in rows] == [128, 256]
    assert all(r["reference_ms"] > 0 and r["sdpa_ms"] > 0 and r["max_error_vs_sdpa"] < 1e-4 for r in rows)
    # memory grows linearly for the tiled reference, quadratically for naive attention
    assert rows[1]["naive_peak_mib"] > 3 * rows[0]["naive_peak_mib"]

    timed = data["overhead"]
    assert timed["calls"] == 5 and timed["target_us"] == 10.0
    assert timed["problem"]["seqlen_q"] == 1 and timed["problem"]["seqlen_k"] == 16
    assert timed["problem"]["backends"] == {"forward": "reference", "backward": "reference"}
    us = {(r["provider"], r["mode"]): r["us_per_call"] for r in timed["rows"]}
    modes = {"flash": ("fwd", "fwd_bwd"), "launch:reference": ("fwd",), "sdpa": ("fwd", "fwd_bwd")}
    assert set(us) == {(p, m) for p, ms in modes.items() for m in ms} and all(value > 0 for value in us.values())
    for delta in timed["deltas"]:
        assert delta["peer"] == "sdpa"
        assert delta["delta_us"] == pytest.approx(us[("flash", delta["mode"])] - us[("sdpa", delta["mode"])])
    assert {d["mode"] for d in timed["deltas"]} == {"fwd", "fwd_bwd"}
    assert "flash - sdpa" in result.stdout


class _Fake:
    devices = ("cpu",)
    default = False

    def __init__(self, name: str, fail: bool) -> None:
        self.name, self.help, self.fail = name, f"fake {name}", fail

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        pass

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        if self.fail:
            raise RuntimeError("interrupted")
        return Report({self.name: [1, 2]}, f"{self.name} done")


def test_results_are_written_after_every_section(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "SECTIONS", {"first": _Fake("first", False), "second": _Fake("second", True)})
    out = tmp_path / "partial.json"
    with pytest.raises(RuntimeError, match="interrupted"):
        cli.main(["--cpu", "--sections", "first,second", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["first"] == [1, 2] and data["sections"] == ["first", "second"] and "second" not in data
    assert [p.name for p in tmp_path.iterdir()] == ["partial.json"]  # no temporary file left behind


def test_each_device_runs_its_own_default_sections():
    assert defaults(torch.device("cpu")) == ["overhead", "cpu"]
    assert defaults(torch.device("cuda")) == ["attention", "overhead"]
    assert all(name == section.name and section.help for name, section in SECTIONS.items())


def test_the_ratio_table_fits_100_columns_whatever_the_number_of_providers():
    providers = ["triton", "cuda", "another", "sdpa-flash", "sdpa-cudnn", "flex", "sdpa"]
    rows = [
        attention.Row(p, "fwd_bwd", causal, 128, 16384, 1, 16, 1.0, 400.0 + i)
        for i, p in enumerate(providers)
        for causal in (False, True)
    ]
    table = attention.ratio_table(rows)
    assert max(map(len, table.splitlines())) <= 100
    assert all(p in table for p in providers) and "(1.00x)" in table


def test_the_overhead_summary_gives_the_gap_and_the_target():
    result = {
        "problem": {"seqlen_q": 1, "seqlen_k": 16, "heads": 8, "head_dim": 64, "dtype": "bfloat16", "device": "cuda"},
        "calls": 400,
        "target_us": 10.0,
        "rows": [
            {"provider": "flash", "mode": "fwd", "us_per_call": 40.0},
            {"provider": "flash", "mode": "fwd_bwd", "us_per_call": 300.0},
            {"provider": "sdpa", "mode": "fwd", "us_per_call": 36.0},
            {"provider": "sdpa", "mode": "fwd_bwd", "us_per_call": None},
        ],
        "deltas": [{"mode": "fwd", "peer": "sdpa", "flash_us": 40.0, "peer_us": 36.0, "delta_us": 4.0}],
    }
    text = overhead.summary(result)
    assert "+4.0 us (within the 10 us target)" in text
    assert max(map(len, text.splitlines())) <= 100
    sdpa_line = next(line for line in text.splitlines() if line.startswith("sdpa "))
    assert sdpa_line.split() == ["sdpa", "36.0", "-"]


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_is_attention(causal):
    q, k, v = (torch.randn(2, 33, 3, 16, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    torch.testing.assert_close(naive_attention(q, k, v, causal), expected)


def test_decode_counts_the_bytes_a_step_must_move_and_pages_hold_the_same_keys():
    from flash_bench.sections import decode

    case = decode.Case(batch=2, length=37, page_size=5, heads_q=4, heads_kv=2, head_dim=8)
    assert decode.step_bytes(case) == 2 * (2 * 2 * 37 * 2 * 8 + 2 * 2 * 4 * 8)
    step = decode.make_step(case, torch.device("cpu"), torch.float32)
    table, pool = step.options["block_table"], step.options["k_cache"]
    for b in range(2):
        for j in (0, 4, 5, 36):
            assert torch.equal(pool[table[b, j // 5], j % 5], step.k[b, j])
    out = flash.attention_with_kvcache(step.q, **step.options, backend="reference")
    torch.testing.assert_close(out, flash.attention(step.q, step.k, step.v, backend="reference"))


def test_decode_summary_gives_the_ratios_the_targets_name():
    from flash_bench.sections import decode

    def row(case: str, provider: str, gbps: float | None) -> dict:
        return {"case": case, "provider": provider, "gbps": gbps, "copy_fraction": gbps / 4000 if gbps else None}

    result = {
        "copy_gbps": 4000.0,
        "rows": [
            row("b16 kv32768 contiguous", "triton", 3800.0),
            row("b16 kv32768 contiguous", "sdpa-cudnn", 3900.0),
            row("b16 kv32768 contiguous", "flex", None),
            row("b16 kv32768 paged 16", "triton", 3500.0),
        ],
        "per_call": [
            {
                "case": "b16 kv32768 contiguous",
                "backend": "triton",
                "kernel_us": 500.0,
                "eager_us": 540.0,
                "graph_us": 505.0,
                "eager_overhead_us": 40.0,
                "graph_overhead_us": 5.0,
            }
        ],
        "sweep": [
            {
                "case": "b16 kv32768 contiguous",
                "block_n": 64,
                "num_stages": 4,
                "num_warps": 4,
                "gbps": 3850.0,
                "copy_fraction": 0.96,
            },
        ],
    }
    text = decode.summary(result)
    assert max(map(len, text.splitlines())) <= 100
    assert "95% of copy, 0.97x cuDNN" in text
    assert "+8% vs contiguous (within 10%)" in text
    assert "graph overhead over the kernel: +5.0 us (within the 15 us target)" in text
    assert "eager overhead over the kernel: +40.0 us (above the 15 us target)" in text
    assert "sweep best, b16 kv32768 contiguous: 64 keys, 4 stages, 4 warps" in text


def test_the_masks_section_measures_every_part_and_reports_the_targets(monkeypatch):
    """The masks section on tiny sizes (the CPU): every part yields rows, and the targets are computed from them."""
    from flash_bench.sections import masks

    def once(fn, **_):  # run each measurement once and time nothing: the code paths are the point here
        fn()
        return 1.0

    monkeypatch.setattr(masks.timing, "measure", once)
    results = masks.measure(["padding", "sparse"], "cpu", flex=False, smoke=True)
    assert {(r.section, r.provider) for r in results} >= {("padding", "flash_sdpa"), ("padding", "torch_sdpa"),
                                                          ("padding", "flash_varlen"), ("sparse", "dense")}  # fmt: skip
    assert all(r.ms == 1.0 for r in results), [r.note for r in results if r.ms is None]
    lines = masks.targets(results)
    assert any(line.startswith("padding fwd") for line in lines) and any(
        line.startswith("sparse fwd") for line in lines
    )


def test_the_fp8_section_is_opt_in_and_parses_its_options():
    assert "fp8" in SECTIONS and "fp8" not in defaults(torch.device("cuda"))
    options = cli.build_parser("bench").parse_args(
        ["--sections", "fp8", "--fp8-head-dims", "64,128", "--fp8-causal", "no"]
    )
    assert (options.sections, options.fp8_head_dims, options.fp8_causal) == (["fp8"], [64, 128], "no")
    assert cli.build_parser("bench").parse_args([]).fp8_head_dims == [64, 128, 256]
    with pytest.raises(SystemExit):
        cli.main(["--cpu", "--sections", "fp8"])  # it measures on a GPU


def test_the_fp8_section_times_fp8_and_bf16_and_checks_both_against_float64(monkeypatch):
    """Its code paths on the CPU (reference backend, tiny convention): timing stubbed, errors real."""

    def once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(fp8.timing, "measure", once)
    assert "reference" in fp8.fp8_backends(torch.device("cpu"))  # (and triton under its interpreter)
    rows = fp8.measure(
        backends=["reference"], seqlens=[32], head_dims=[16], causals=[False, True], device=torch.device("cpu"),
        tokens=64, model_dim=32,
    )  # fmt: skip
    by = {(r.provider, r.dtype, r.causal): r for r in rows}
    assert set(by) == {(p, d, c) for p, d in [("reference", "fp8_e4m3"), ("reference", "bf16"), ("sdpa-cudnn", "bf16")]
                       for c in (False, True)}  # fmt: skip
    for causal in (False, True):
        for dtype in ("fp8_e4m3", "bf16"):
            row = by[("reference", dtype, causal)]
            assert (row.batch, row.heads, row.ms) == (2, 2, 1.0) and row.tflops
            assert 0 < row.max_error < 2**-6  # the bf16 output's rounding, against the inputs the call received
        peer = by[("sdpa-cudnn", "bf16", causal)]
        assert peer.ms is None and peer.note  # cuDNN takes no CPU tensors: recorded, not fatal


def test_the_fp8_ratio_table_gives_both_ratios_and_fits_100_columns():
    def row(provider: str, dtype: str, tflops: float | None) -> fp8.Row:
        return fp8.Row(provider, dtype, True, 128, 16384, 1, 16, 1.0 if tflops else None, tflops)

    backends = ["triton", "cuda", "another", "fourth"]
    rows = [row("sdpa-cudnn", "bf16", 500.0)]
    rows += [row(b, dtype, 600.0 if dtype == "bf16" else 900.0) for b in backends for dtype in ("bf16", "fp8_e4m3")]
    rows.append(row("late", "fp8_e4m3", None))
    table = fp8.ratio_table(rows)
    assert max(map(len, table.splitlines())) <= 100
    line = next(line for line in table.splitlines() if line.startswith("causal"))
    assert line.split()[:7] == ["causal", "128", "16384", "500.0", "900.0", "1.50x", "1.80x"]
    assert all(f"{b} fp8" in table for b in backends)
