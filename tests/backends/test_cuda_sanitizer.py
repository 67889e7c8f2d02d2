"""CUDA backend under compute-sanitizer: memcheck (out-of-bounds, misaligned), racecheck (shared memory)
and synccheck (barriers).

The tests run this file as a script under ``compute-sanitizer --tool memcheck|racecheck|synccheck``;
the script launches the forward on a representative set of small shapes (odd lengths, causal, windows,
GQA/MQA, varlen, strided layouts, every head-dim bucket, fp8, and every variant the tuner may pick), or (its
``backward`` part) the backward of the cases whose backward runs on ``cuda`` (the Hopper backward on
sm_90). The backward's open findings are expected failures (``BACKWARD_FINDINGS``).
Skipped without a GPU or without compute-sanitizer on the PATH (or under $CUDA_HOME/bin).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


#: What the Hopper backward is not yet clean under (H200, 2026-12-02; PERF_NOTES.md of flash-cuda,
#: "Hopper backward: sanitizers"): strict, so that a fix shows up as an unexpected pass.
BACKWARD_FINDINGS = {
    "racecheck": "hazards between the producer's bulk loads of the LSE/delta ring and the consumers' reads of "
    "it, every pair ordered by the stage's full/empty mbarriers: racecheck does not follow a bulk copy's "
    "completion through an mbarrier (test_racecheck_does_not_follow_bulk_copies)",
}


@pytest.mark.gpu
@pytest.mark.long
@pytest.mark.parametrize("part", ["forward", "backward"])
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_sanitizer_is_clean(tool, part, request):
    pytest.importorskip("flash_cuda")
    from flash.registry import REGISTRY

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reasons = REGISTRY.unavailable_reasons("cuda")
    if reasons:
        pytest.skip(f"cuda backend unusable: {'; '.join(reasons)}")
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    if part == "backward" and tool in BACKWARD_FINDINGS:
        request.applymarker(pytest.mark.xfail(reason=BACKWARD_FINDINGS[tool], strict=True))
    command = [sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, __file__, part]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    print(output[-4000:])
    log_dir = os.environ.get("FLASH_SANITIZER_LOG")  # the device script keeps whole reports, xfails' too
    if log_dir:
        with open(os.path.join(log_dir, f"sanitizer-{tool}-{part}.log"), "w") as log:
            log.write(output)
    assert "SANITIZER CASES DONE" in output, output[-4000:]
    # memcheck and synccheck end with "ERROR SUMMARY: 0 errors", racecheck with "RACECHECK SUMMARY: 0 hazards ..."
    clean = "RACECHECK SUMMARY: 0 hazards displayed (0 errors" if tool == "racecheck" else "ERROR SUMMARY: 0 errors"
    assert done.returncode == 0 and clean in output, output[-4000:]


@pytest.mark.gpu
@pytest.mark.long
def test_racecheck_does_not_follow_bulk_copies():
    """The reason of the backward's racecheck finding, kept honest: a minimal producer/consumer ring
    (scripts/racecheck_probe.py: one thread bulk-copies into two stages, four warps read them with
    ordinary loads, full/empty mbarriers in between, the sums checked) is reported by racecheck too.
    When a compute-sanitizer follows bulk copies through mbarriers this fails, and the backward's
    expected failure must be looked at again."""
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    probe = os.path.join(root, "packages", "flash-cuda", "scripts", "racecheck_probe.py")
    command = [sanitizer, "--tool", "racecheck", sys.executable, probe]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert "probe ok" in output, output[-4000:]  # the protocol itself is right: every sum checked
    assert "RACECHECK SUMMARY: 0 hazards" not in output, output[-4000:]


def _cases():
    from flash.testing import Case

    base = Case("san", batch=2, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16)
    fp8 = replace(base, dtype=torch.float8_e4m3fn, descale="head", backward=False)
    return [
        replace(base, name="odd_full", seqlen_q=77, seqlen_k=131),
        replace(base, name="odd_causal", causal=True, seqlen_q=131, seqlen_k=77),
        replace(base, name="causal_d128_mqa", head_dim=128, heads_kv=1, causal=True, seqlen_q=200, seqlen_k=200),
        replace(base, name="fp16_d32", dtype=torch.float16, head_dim=32, seqlen_q=65, seqlen_k=63),
        replace(base, name="d96_window", head_dim=96, window=(20, 5), seqlen_q=150, seqlen_k=160),
        replace(base, name="d256_causal", head_dim=256, causal=True, seqlen_q=70, seqlen_k=90, heads_q=2, heads_kv=2),
        replace(base, name="d40_strided_bhsd", head_dim=40, strided=True, layout="bhsd", seqlen_q=50, seqlen_k=61),
        replace(base, name="varlen", seqlens=((1, 1), (130, 70), (0, 9), (65, 0), (33, 200))),
        replace(base, name="one_query", seqlen_q=1, seqlen_k=300, causal=True),
        replace(base, name="softcap_causal", softcap=5.0, causal=True, seqlen_q=150, seqlen_k=290),
        replace(base, name="deterministic_d128", head_dim=128, deterministic=True, seqlen_q=130, seqlen_k=400),
        # fp8: the V^T pre-pass too (varlen sequences off 32-key steps, an empty one; a strided layout)
        replace(fp8, name="fp8_varlen", descale="tensor", seqlens=((1, 1), (130, 70), (0, 9), (65, 0), (33, 200))),
        replace(fp8, name="fp8_d128_causal_bhsd", head_dim=128, layout="bhsd", causal=True, seqlen_q=131, seqlen_k=77),
    ]


def main(part: str) -> None:
    import flash
    from flash.backend import ForwardArgs
    from flash.spec import canonical, canonical_lse
    from flash.testing import make_inputs
    from flash.testing.conformance import spec_of
    from flash_cuda import launch, tune, variants

    if part == "backward":
        backward_cases()
        return
    for case in _cases():
        inputs = make_inputs(case, "cuda", seed=7)
        out = flash.attention(inputs.q, inputs.k, inputs.v, backend="cuda", **inputs.options)
        torch.cuda.synchronize()
        print(f"{case.name}: finite {bool(torch.isfinite(out).all())}", flush=True)
    # Every tuning candidate, masked, with a partial last block on both axes.
    arch = variants.nvrtc_arch(torch.cuda.get_device_capability())
    for d, configs in tune.CANDIDATES.items():
        for config in configs:
            case = _cases()[1]
            case = replace(case, head_dim=d)
            inputs = make_inputs(case, "cuda", seed=3)
            spec = spec_of(inputs)
            out = torch.empty_like(inputs.q)
            lse = torch.empty(spec.lse_shape(), device="cuda")
            args = ForwardArgs(canonical(inputs.q, spec), canonical(inputs.k, spec), canonical(inputs.v, spec),
                               canonical(out, spec), canonical_lse(lse, spec))  # fmt: skip
            variant = variants.make_variant(config, d, True, variants.MASK_RIGHT, arch)  # a causal case
            launch.forward(spec, args, variant)
            torch.cuda.synchronize()
            print(f"{variant.label()}: finite {bool(torch.isfinite(out).all())}", flush=True)
    print("SANITIZER CASES DONE", flush=True)


def backward_cases() -> None:
    """The backward of every case whose backward runs on the cuda backend (the others go to triton)."""
    import flash
    from flash.testing import make_inputs

    for case in _cases():
        inputs = make_inputs(case, "cuda", seed=11)
        explanation = str(flash.explain(inputs.q, inputs.k, inputs.v, backend="cuda", **inputs.options))
        if not explanation[explanation.index("backward:") :].startswith("backward: cuda"):
            continue
        q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
        out = flash.attention(q, k, v, backend="cuda", **inputs.options)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"{case.name} backward: finite {all(bool(torch.isfinite(g).all()) for g in grads)}", flush=True)
    print("SANITIZER CASES DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "forward")
