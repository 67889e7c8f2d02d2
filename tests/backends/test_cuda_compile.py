"""CUDA backend, CPU tier: every shipped kernel variant compiles with NVRTC and does not spill.

Needs only libnvrtc (``pip install flash-cuda[nvrtc]``); skipped with the reason when it is missing.
Also checks, without a GPU, what the backend declares, how it picks variants, and that the kernel's
parameter list and the launcher's argument list agree.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

flash_cuda = pytest.importorskip("flash_cuda")

import flash  # noqa: E402
from flash import heuristics, support  # noqa: E402
from flash.backend import ForwardArgs  # noqa: E402
from flash.heuristics import smem  # noqa: E402
from flash.spec import canonical, canonical_lse  # noqa: E402
from flash_cuda import backend as cuda_backend  # noqa: E402
from flash_cuda import launch, nvrtc, tune, variants  # noqa: E402
from flash_cuda.sources import read_kernel_file  # noqa: E402


def reasons(backend, pass_, spec):
    return support.reasons(backend, spec, pass_)


#: Where to write the register report as JSON (the GPU check sets it to collect the report).
REPORT_ENV = "FLASH_CUDA_REPORT"
TABLE_ARCHS = {"sm_90": "sm_90a", "sm_80": "sm_80"}
BUCKET_DIMS = {32: (32,), 64: (64,), 128: (96, 128), 256: (256,)}


def shipped_variants() -> list[variants.Variant]:
    """One variant per table entry of the CUDA backend, head dim that entry serves and mask it can meet.

    Non-causal entries also serve windows (both mask edges); causal ones causal windows.
    """
    found = []
    for key, entry in heuristics.table_of(cuda_backend.CudaBackend()).items():
        if key.pass_ != "forward" or key.arch not in TABLE_ARCHS:
            continue
        masks = (variants.MASK_RIGHT, variants.MASK_BOTH) if key.causal else (variants.MASK_NONE, variants.MASK_BOTH)
        for d in BUCKET_DIMS[key.head_dim]:
            for mask in masks:
                found.append(variants.make_variant(entry.config, d, key.dtype == "bf16", mask, TABLE_ARCHS[key.arch]))
    return sorted(set(found), key=lambda v: v.label())


def _compile(variant: variants.Variant) -> nvrtc.Resources:
    compiled = nvrtc.compile_cubin(variants.source(), (*variant.options(), "-ftz=true", "-Xptxas=-v"))
    assert compiled.cubin[:4] == b"\x7fELF", "NVRTC did not return a cubin"
    report = nvrtc.parse_ptxas(compiled.log)
    assert variants.KERNEL_NAME in report, f"no ptxas report for {variant.label()} in:\n{compiled.log}"
    return report[variants.KERNEL_NAME]


def _compile_all(found: list[variants.Variant]) -> list[nvrtc.Resources]:
    # Processes, not threads: ptxas's -v report reaches NVRTC's program log through process-wide
    # state, and concurrent compiles in one process were seen to lose a report (NVRTC 13.0).
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(_compile, found))


@pytest.fixture(scope="module")
def compiled_shipped() -> dict[variants.Variant, nvrtc.Resources]:
    reason = nvrtc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    shipped = shipped_variants()
    results = dict(zip(shipped, _compile_all(shipped)))
    report = [
        {"variant": v.label(), "registers": r.registers, "stack": r.stack_frame, "spill_stores": r.spill_stores,
         "spill_loads": r.spill_loads, "smem": v.smem_bytes}
        for v, r in results.items()
    ]  # fmt: skip
    print(f"\nNVRTC {nvrtc.version()} ({nvrtc.library()._flash_path}):")
    for row in report:
        print(
            f"  {row['variant']:64s} {row['registers']:3d} regs, stack {row['stack']}, "
            f"spill {row['spill_stores']}/{row['spill_loads']}, smem {row['smem']} B"
        )
    if os.environ.get(REPORT_ENV):
        with open(os.environ[REPORT_ENV], "w") as fh:
            json.dump({"nvrtc": list(nvrtc.version()), "variants": report}, fh, indent=1)
    return results


def test_table_ships_variants_for_both_archs_and_every_bucket():
    shipped = shipped_variants()
    assert {v.arch for v in shipped} == {"sm_90a", "sm_80"}
    assert {v.head_dim for v in shipped} == {32, 64, 96, 128, 256}
    assert {(v.bf16, v.mask) for v in shipped} == {(a, b) for a in (False, True) for b in (0, 1, 2)}


def test_every_shipped_variant_compiles_without_spilling(compiled_shipped):
    bad = {v.label(): r for v, r in compiled_shipped.items() if r.spills or r.stack_frame}
    assert not bad, f"variants that spill or use a stack frame: {bad}"
    for variant, res in compiled_shipped.items():
        assert res.registers <= 65536 // (variant.threads * variant.min_blocks), variant.label()
        assert res.arch == variant.arch


def test_tuning_candidates_compile():
    reason = nvrtc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    candidates = [
        variants.make_variant(config, d, True, mask, "sm_90a")
        for d, configs in tune.CANDIDATES.items()
        for mask in (variants.MASK_NONE, variants.MASK_RIGHT)
        for config in configs
    ]
    results = _compile_all(candidates)
    for variant, res in zip(candidates, results):
        print(f"  {variant.label():64s} {res.registers:3d} regs, spill {res.spill_stores}/{res.spill_loads}")
        assert not res.spills, variant.label()


def test_every_table_entry_fits_its_gpu_exactly():
    for key, entry in heuristics.table_of(cuda_backend.CudaBackend()).items():
        if key.pass_ != "forward":
            continue  # the backward rows only name the Hopper backward's one tile shape (hopper_bwd.py)
        for d in BUCKET_DIMS[key.head_dim]:
            arch = TABLE_ARCHS[key.arch]
            variant = variants.make_variant(entry.config, d, True, int(key.causal), arch)
            assert variant.smem_bytes <= variants.max_smem(arch), (key, variant)
            assert (variant.block_m, variant.block_n, variant.num_stages) == (
                entry.config.block_m,
                entry.config.block_n,
                entry.config.num_stages,
            ), f"{key}: shrunk to fit, the table entry is too large"
            assert smem.budget(entry.config, key.arch, variants.smem_row(key.head_dim), 2, "forward").fits


def test_source_is_self_contained_and_header_free():
    text = variants.source()
    assert "#include" not in text  # no CUDA headers (cuda_fp16.h, ...): NVRTC needs nothing but itself
    assert 'extern "C" __global__' in text and variants.KERNEL_NAME in text


def test_variant_rendering_and_shrinking():
    config = heuristics.KernelConfig(128, 64, 8, 3, (("min_blocks", 1), ("q_in_regs", True)))
    v = variants.make_variant(config, 40, True, variants.MASK_BOTH, "sm_90a")
    assert v.head_dim == 48 and v.num_stages == 3
    assert "-DFLASH_D=48" in v.options() and "-arch=sm_90a" in v.options() and "-DFLASH_MASK=2" in v.options()
    assert "-arch=sm_90a" not in v.options(arch=False)
    small = variants.make_variant(config, 256, True, variants.MASK_RIGHT, "sm_86", smem_limit=99 * 1024)
    assert small.smem_bytes <= 99 * 1024
    with pytest.raises(ValueError):
        variants.Variant(48, 96, 64, 8, 2, True, 1, True, 0, "sm_90a")  # block_m not a multiple of 16 * 8 warps
    assert variants.mask_kind((-1, -1), False) == variants.MASK_NONE
    assert variants.mask_kind((-1, 0), True) == variants.MASK_RIGHT
    assert variants.mask_kind((-1, 7), True) == variants.MASK_RIGHT
    assert variants.mask_kind((5, 0), True) == variants.MASK_BOTH
    assert variants.mask_kind((5, -1), True) == variants.MASK_BOTH
    assert variants.nvrtc_arch((9, 0)) == "sm_90a" and variants.nvrtc_arch((8, 6)) == "sm_86"


def _kernel_parameter_types() -> list[str]:
    text = read_kernel_file(variants.ENTRY_FILE)
    signature = re.search(r"flash_fwd_kernel\((.*?)\)\s*\{", text, re.S).group(1)
    types = []
    for raw in signature.split(","):
        param = raw.replace("__restrict__", "").strip()
        types.append("ptr" if "*" in param else param.rsplit(" ", 1)[0].strip())
    return types


def test_launch_arguments_match_the_kernel_signature():
    q = torch.randn(2, 37, 4, 64, dtype=torch.bfloat16)
    k = v = torch.randn(2, 29, 2, 64, dtype=torch.bfloat16)
    spec = flash.build_spec(q, k, v, causal=True)
    out, lse = torch.empty_like(q), torch.empty(spec.lse_shape())
    args = ForwardArgs(canonical(q, spec), canonical(k, spec), canonical(v, spec), canonical(out, spec),
                       canonical_lse(lse, spec))  # fmt: skip
    variant = variants.make_variant(heuristics.KernelConfig(128, 64, 8, 2), 64, True, variants.MASK_RIGHT, "sm_90a")
    params = launch.kernel_arguments(spec, args, variant)
    expected = {"ptr": "uint64", "i64": "int64", "int": "int32", "float": "float32"}
    assert [expected[t] for t in _kernel_parameter_types()] == [type(p).__name__ for p in params]
    assert int(params[-3]) == launch.UNBOUNDED_REACH and int(params[-2]) == 0  # causal: left open, right 0


def test_parse_ptxas_report():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'flash_fwd_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for flash_fwd_kernel\n"
        "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]\n"
    )
    res = nvrtc.parse_ptxas(log)["flash_fwd_kernel"]
    assert (res.registers, res.stack_frame, res.spill_stores, res.spill_loads, res.barriers) == (255, 8, 4, 12, 1)
    assert res.spills and res.arch == "sm_90a"


def test_registered_through_the_entry_point():
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="flash.backends")}
    assert found.get("cuda") == "flash_cuda.backend:CudaBackend"


def test_importing_flash_and_the_backend_does_not_import_cupy():
    code = "import sys, flash, flash_cuda.backend; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Specs on a CUDA device of compute capability 9.0, without a GPU."""
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(cuda_backend, "_index", lambda device: 0)
    monkeypatch.setattr(support, "_capability", lambda index: (9, 0))

    def on_gpu(spec):
        return dataclasses.replace(spec, device=torch.device("cuda", 0))

    return on_gpu


def _spec(dtype=torch.bfloat16, d=64, **options):
    q = torch.randn(2, 33, 4, d).to(dtype)
    k = v = torch.randn(2, 31, 2, d).to(dtype)
    return flash.build_spec(q, k, v, **options)


def test_declares_what_it_does_not_support(pretend_gpu):
    be = cuda_backend.CudaBackend()
    assert reasons(be, "forward", pretend_gpu(_spec(causal=True))) == []
    assert reasons(be, "forward", pretend_gpu(_spec(window=(5, 2)))) == []
    assert reasons(be, "forward", pretend_gpu(_spec(d=40, dtype=torch.float16, deterministic=True))) == []
    assert any("softcap" in r for r in reasons(be, "forward", pretend_gpu(_spec(softcap=3.0))))
    assert any("dropout" in r for r in reasons(be, "forward", pretend_gpu(_spec(dropout_p=0.1, dropout_seed=1))))
    assert any("dtype" in r for r in reasons(be, "forward", pretend_gpu(_spec(dtype=torch.float32))))
    assert any("multiples of 8" in r for r in reasons(be, "forward", pretend_gpu(_spec(d=20))))
    unaligned = dataclasses.replace(pretend_gpu(_spec()), aligned16=False)
    assert any("16 bytes" in r for r in reasons(be, "forward", unaligned))
    assert any("tensors on cpu" in r for r in reasons(be, "forward", _spec()))
    # the Hopper backward (issue 14) on sm_90; what it lacks is declined with its reason
    assert reasons(be, "backward", pretend_gpu(_spec())) == []
    assert reasons(be, "backward", pretend_gpu(_spec(softcap=3.0))) == []
    assert reasons(be, "backward", pretend_gpu(_spec(deterministic=True))) == []
    assert any("dropout" in r for r in reasons(be, "backward", pretend_gpu(_spec(dropout_p=0.1, dropout_seed=1))))
    assert any("head_dim" in r for r in reasons(be, "backward", pretend_gpu(_spec(d=192))))


def test_old_gpus_are_declined(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(support, "_capability", lambda index: (7, 5))
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (7, 5))
    cuda_backend._hopper_reasons.cache_clear()
    spec = dataclasses.replace(_spec(), device=torch.device("cuda", 0))
    assert any("sm_80" in r for r in reasons(cuda_backend.CudaBackend(), "forward", spec))


def test_backend_picks_the_table_variant(pretend_gpu, monkeypatch):
    monkeypatch.setattr(cuda_backend, "_smem_optin", lambda index: 227 * 1024)
    monkeypatch.setattr(heuristics, "arch_of", lambda device: "sm_90")
    cuda_backend._variant.cache_clear()
    be = cuda_backend.CudaBackend()
    for d, causal in ((64, False), (128, True), (40, False), (256, True)):
        spec = pretend_gpu(_spec(d=d, causal=causal))
        variant = be.variant(spec, heuristics.config_for(be, spec, "forward"))
        entry = heuristics.lookup(be, "sm_90", "bf16", d, causal, "forward")
        assert variant.arch == "sm_90a" and variant.mask == int(causal) and variant.bf16
        assert variant.head_dim == variants.compiled_head_dim(d)
        assert (variant.block_m, variant.block_n, variant.num_warps) == (
            entry.config.block_m,
            entry.config.block_n,
            entry.config.num_warps,
        )
    cuda_backend._variant.cache_clear()


def test_hopper_kernel_takes_what_tma_can_read(pretend_gpu, monkeypatch):
    """On sm_90 the Hopper kernel runs aligned problems (softcap too); what TMA cannot read goes to the
    mma.sync kernel, and softcap, which only the Hopper kernel has, is then declined with its reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda_backend._hopper_reasons.cache_clear()
    be = cuda_backend.CudaBackend()
    try:
        aligned = pretend_gpu(_spec(d=128, causal=True, softcap=5.0))
        assert be.uses_hopper(aligned) and reasons(be, "forward", aligned) == []
        unaligned = dataclasses.replace(aligned, aligned16=False)
        assert not be.uses_hopper(unaligned)
        assert any("softcap: only the Hopper kernel" in r for r in reasons(be, "forward", unaligned))
        plain = dataclasses.replace(unaligned, softcap=0.0)
        assert not be.uses_hopper(plain)
        fp8 = pretend_gpu(_spec(dtype=torch.float8_e4m3fn, d=128, causal=True))
        assert be.uses_hopper(fp8) and reasons(be, "forward", fp8) == []
        fp8_unaligned = dataclasses.replace(fp8, aligned16=False)
        assert any("fp8 inputs: only the Hopper kernel" in r for r in reasons(be, "forward", fp8_unaligned))
        assert any("multiple of 16" in r for r in reasons(be, "forward", pretend_gpu(_spec(torch.float8_e5m2, 40))))
        assert reasons(be, "backward", fp8) != []
        monkeypatch.setattr(cuda_backend, "_capability", lambda index: (8, 0))
        monkeypatch.setattr(support, "_capability", lambda index: (8, 0))
        ampere = pretend_gpu(_spec(d=128, causal=True))
        assert not be.uses_hopper(ampere) and reasons(be, "forward", ampere) == []
    finally:
        cuda_backend._hopper_reasons.cache_clear()


def _interval_specs() -> dict[str, object]:
    """Specs whose rows see intervals of keys: key padding (right, with holes), a prefix-LM block mask."""
    q = torch.randn(2, 33, 4, 128).to(torch.bfloat16)
    k = v = torch.randn(2, 31, 2, 128).to(torch.bfloat16)
    padding = (torch.arange(31) < torch.tensor([[31], [5]]))[:, None, None, :]
    holes = padding.clone()
    holes[1, ..., 2] = False
    prefix = flash.BlockMask.from_mask_mod(
        lambda b, h, i, j: (j <= i) | (j < 8), batch=None, heads=None, seqlen_q=33, seqlen_k=31, block_size=(16, 16)
    )
    assert prefix.key_intervals is not None
    return {
        "padding": flash.build_spec(q, k, v, attn_mask=padding),
        "padding_causal_holes": flash.build_spec(q, k, v, attn_mask=holes, causal=True),
        "prefix_lm": flash.build_spec(q, k, v, block_mask=prefix),
        "fp8_padding": flash.build_spec(
            q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), attn_mask=padding
        ),
    }


def test_hopper_kernel_takes_key_padding_and_key_intervals(pretend_gpu, monkeypatch):
    """On sm_90 the Hopper forward runs key-padding masks and block masks with key intervals (any window),
    and flash.explain says cuda is eligible; fp8 with them, the mma.sync kernel (sm_80) and layouts TMA
    cannot read are declined with their reasons; the backward is not declared (another backend's)."""
    from flash import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch.REGISTRY, "unavailable_reasons", lambda name: [])
    cuda_backend._hopper_reasons.cache_clear()
    be = cuda_backend.CudaBackend()
    try:
        specs = {name: pretend_gpu(spec) for name, spec in _interval_specs().items()}
        for name in ("padding", "padding_causal_holes", "prefix_lm"):
            assert be.uses_hopper(specs[name]) and reasons(be, "forward", specs[name]) == [], name
            forward = str(dispatch.explain(specs[name]).forward)
            assert re.search(r"cuda\s+priority\s+\d+\s+eligible", forward), forward
        assert any("fp8 inputs with a key-padding mask" in r for r in reasons(be, "forward", specs["fp8_padding"]))
        unaligned = dataclasses.replace(specs["padding"], aligned16=False)
        assert any(
            "key-padding masks and key intervals: only the Hopper" in r for r in reasons(be, "forward", unaligned)
        )
        monkeypatch.setattr(cuda_backend, "_capability", lambda index: (8, 0))
        monkeypatch.setattr(support, "_capability", lambda index: (8, 0))
        cuda_backend._hopper_reasons.cache_clear()
        assert any("only the Hopper kernel" in r for r in reasons(be, "forward", specs["prefix_lm"]))
    finally:
        cuda_backend._hopper_reasons.cache_clear()


def _block_sparse_specs() -> dict[str, object]:
    """Specs with block masks of full blocks only (random 128x128 blocks plus the diagonal, odd sizes: the
    tail blocks are partial only past the ends), and the ones the Hopper forward declines."""
    from flash.testing.mod_examples import block_pattern

    q = torch.randn(2, 300, 4, 128).to(torch.bfloat16)
    k = v = torch.randn(2, 290, 2, 128).to(torch.bfloat16)

    def mask(block_size: tuple[int, int]) -> flash.BlockMask:
        return flash.BlockMask.from_mask_mod(block_pattern, batch=None, heads=None, seqlen_q=300, seqlen_k=290,
                                             block_size=block_size)  # fmt: skip

    blocks, small = mask((128, 128)), mask((64, 64))
    assert blocks.info.feature == small.info.feature == "block_sparse"
    eight = lambda t: t.to(torch.float8_e4m3fn)  # noqa: E731
    return {
        "blocks": flash.build_spec(q, k, v, block_mask=blocks),
        "small_blocks": flash.build_spec(q, k, v, block_mask=small),
        "causal": flash.build_spec(q, k, v, block_mask=blocks, causal=True),
        "fp8": flash.build_spec(eight(q), eight(k), eight(v), block_mask=blocks),
    }


def test_hopper_kernel_takes_block_sparse_masks(pretend_gpu, monkeypatch):
    """On sm_90 the Hopper forward walks the lists of block masks with full blocks only (128-row blocks whose
    columns its key blocks divide) and flash.explain says cuda is eligible; other block sizes, a window and
    fp8 are declined with their reasons, as is the mma.sync kernel (sm_80)."""
    from flash import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch.REGISTRY, "unavailable_reasons", lambda name: [])
    cuda_backend._hopper_reasons.cache_clear()
    be = cuda_backend.CudaBackend()
    try:
        specs = {name: pretend_gpu(spec) for name, spec in _block_sparse_specs().items()}
        assert "block_sparse" in specs["blocks"].features()
        assert be.uses_hopper(specs["blocks"]) and reasons(be, "forward", specs["blocks"]) == []
        forward = str(dispatch.explain(specs["blocks"]).forward)
        assert re.search(r"cuda\s+priority\s+\d+\s+eligible", forward), forward
        declined = {"small_blocks": "64x64 blocks", "causal": "causal or a window", "fp8": "fp8 inputs with a block"}
        for name, why in declined.items():
            found = reasons(be, "forward", specs[name])
            assert any("only the Hopper kernel" in r and why in r for r in found), (name, found)
        monkeypatch.setattr(cuda_backend, "_capability", lambda index: (8, 0))
        monkeypatch.setattr(support, "_capability", lambda index: (8, 0))
        cuda_backend._hopper_reasons.cache_clear()
        assert any("only the Hopper kernel" in r for r in reasons(be, "forward", specs["blocks"]))
    finally:
        cuda_backend._hopper_reasons.cache_clear()


def test_hopper_backward_takes_alibi_with_a_right_reach_of_0(pretend_gpu, monkeypatch):
    """The Hopper backward declares ALiBi (slopes per head or per (batch, head)) with causal or a window of
    right reach 0, and flash.explain says cuda is eligible for the backward of a causal ALiBi problem on
    sm_90; other reaches and the options no ALiBi variant is compiled with are declined with their reasons."""
    from flash import dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch.REGISTRY, "unavailable_reasons", lambda name: [])
    cuda_backend._hopper_bwd_reasons.cache_clear()
    be = cuda_backend.CudaBackend()
    per_head, per_batch_head = torch.rand(4), torch.rand(2, 4)
    try:
        for options in ({"causal": True, "alibi_slopes": per_head}, {"causal": True, "alibi_slopes": per_batch_head},
                        {"window": (5, 0), "alibi_slopes": per_head}):  # fmt: skip
            spec = pretend_gpu(_spec(d=128, **options))
            assert reasons(be, "backward", spec) == [], options
        backward = str(dispatch.explain(pretend_gpu(_spec(d=128, causal=True, alibi_slopes=per_head))).backward)
        assert re.search(r"cuda\s+priority\s+\d+\s+eligible", backward), backward
        for options, words in (
            ({}, "alibi with right reach -1"),
            ({"window": (5, 2)}, "alibi with right reach 2"),
            ({"causal": True, "softcap": 3.0}, "alibi with softcap"),
            ({"causal": True, "deterministic": True}, "alibi with deterministic"),
        ):
            found = reasons(be, "backward", pretend_gpu(_spec(alibi_slopes=per_head, **options)))
            assert any(words in r for r in found), (options, found)
    finally:
        cuda_backend._hopper_bwd_reasons.cache_clear()
