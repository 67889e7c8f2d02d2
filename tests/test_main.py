"""The main job and the benchmark entry point run end to end (on the CPU here)."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flash", *args], capture_output=True, text=True, check=False)


def test_main_job_checks_every_result_against_the_oracle():
    result = run("--device", "cpu", "--seqlens", "64,200")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backends:" in result.stdout and "reference" in result.stdout
    assert "4/4 results within tolerance" in result.stdout
    assert result.stdout.count("max error") == 4 and "naive" in result.stdout


def test_cpu_benchmark_writes_json_with_environment(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--cpu", "--seqlens", "128,256", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["environment"]["date"]
    rows = data["cpu"]
    assert [r["seqlen"] for r in rows] == [128, 256]
    assert all(r["reference_ms"] > 0 and r["sdpa_ms"] > 0 and r["max_error_vs_sdpa"] < 1e-4 for r in rows)
    # memory grows linearly for the tiled reference, quadratically for naive attention
    assert rows[1]["naive_peak_mib"] > 3 * rows[0]["naive_peak_mib"]
