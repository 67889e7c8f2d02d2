"""Compile flash-triton's kernels for a GPU architecture without a GPU, and report their resources.

Triton ships ptxas, cuobjdump and nvdisasm, so the kernels can be compiled ahead of time on any
machine: this runs the real launch code (:mod:`flash_triton.launch`) on CPU tensors of the right
shapes and strides, but compiles each launch for ``--arch`` instead of running it. Per kernel it
prints the registers per thread, spilled bytes, shared memory, the count of Hopper warpgroup MMA
instructions (HGMMA) and warp-synchronous MMAs (HMMA) in the SASS, and the compile time: the
facts that decide occupancy and whether the tensor-core path is the fast one.

    python packages/flash-triton/scripts/compile_report.py --head-dims 64,128 --causal both
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import types

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from flash import mods as torch_mods
from flash.backend import BackwardArgs, ForwardArgs
from flash.block_mask import BlockMask
from flash.heuristics import KernelConfig
from flash.plan import CallMasks
from flash.spec import build_spec, canonical, canonical_lse
from flash_triton import launch, runtime
from flash_triton.backend import TritonBackend

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
RESULTS: list[dict] = []


def ptx_loops(ptx: str) -> list[dict]:
    """Per-thread costs of each loop of the PTX that holds a matrix product (a kernel's tile loops, in
    order): instructions; 16-byte asynchronous copies (K/V rows) and 4-byte ones (block-table
    entries); synchronous global loads; copy groups committed per iteration and the ``wait_group``
    count (groups left in flight while a tile is used: over the groups per tile, the tiles ahead);
    integer divisions/remainders and 64-bit multiplies (address arithmetic)."""
    lines = ptx.splitlines()
    labels: dict[str, int] = {}
    found = []
    for i, line in enumerate(lines):
        label = re.match(r"^(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        back = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if not back or labels.get(back.group(1), i) >= i:
            continue
        body = lines[labels[back.group(1)] : i + 1]
        text = "\n".join(body)
        if "mma.sync" not in text:
            continue
        waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", text)]
        found.append(
            {
                "instructions": sum(1 for x in body if x.strip() and not x.strip().startswith(("//", "$", "{", "}"))),
                "copies_16B": len(re.findall(r"cp\.async\.cg\.shared\.global[^\n]*, 0x10", text)),
                "copies_4B": len(re.findall(r"cp\.async\.ca\.shared\.global[^\n]*, 0x4", text)),
                "ld_global": len(re.findall(r"\bld\.global", text)),
                "groups": len(re.findall(r"cp\.async\.commit_group", text)),
                "wait_group": min(waits) if waits else -1,
                "div_rem": len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)", text)),
                "mul64": len(re.findall(r"\bmul\.(?:wide\.[su]32|lo\.[su]64)", text)),
            }
        )
    return found


def sass_loop_sizes(sass: str) -> list[int]:
    """SASS instructions in each loop that holds a matrix product (HMMA/HGMMA), in order."""
    code = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    sizes = []
    for address, text in code:
        back = re.search(r"\bBRA\b[^;]*?(0x[0-9a-f]+)", text)
        if back and int(back.group(1), 16) < address:
            body = [t for a, t in code if int(back.group(1), 16) <= a <= address]
            if any(re.search(r"\bH(?:G)?MMA\b", t) for t in body):
                sizes.append(len(body))
    return sizes


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        usage = subprocess.run(
            [f"{BIN}/cuobjdump", "--dump-resource-usage", path], capture_output=True, text=True, check=True
        )
        sass = subprocess.run(
            [f"{BIN}/cuobjdump", "--dump-sass", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", usage.stdout)
    stack = re.search(r"STACK:(\d+)", usage.stdout)
    local = re.search(r"LOCAL:(\d+)", usage.stdout)
    return {
        "regs": int(reg.group(1)) if reg else -1,
        "stack": int(stack.group(1)) if stack else -1,
        "local": int(local.group(1)) if local else -1,
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "qgmma": len(re.findall(r"\bQGMMA\b", sass)),  # fp8 operands
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "ldl_stl": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "tma": len(re.findall(r"\bUTMALDG\b", sass)),
        "sass_loops": sass_loop_sizes(sass),
    }


class _Compiler:
    """Stands in for a ``@triton.jit`` function's ``[grid]`` launch: compiles instead of running."""

    def __init__(self, fn, arch: int, label: str):
        self.fn, self.arch, self.label = fn, arch, label

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            target = GPUTarget("cuda", self.arch, 32)
            backend = make_backend(target)
            kwargs = dict(kwargs, debug=False)
            binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound, specialization, options)
            t0 = time.perf_counter()
            kernel = compile(ASTSource(self.fn, signature, constexprs, attrs), target=target, options=options.__dict__)
            seconds = time.perf_counter() - t0
            row = {
                "kernel": self.fn.__name__,
                "case": self.label,
                "grid": grid,
                "shared": kernel.metadata.shared,
                "seconds": round(seconds, 1),
                "warps": options.num_warps,
                "stages": options.num_stages,
                **{k: v for k, v in kwargs.items() if k.isupper()},
            }
            row.update(resources(kernel.asm["cubin"]))
            row["loops"] = ptx_loops(kernel.asm["ptx"])
            dump = os.environ.get("FLASH_COMPILE_REPORT_DUMP")
            if dump:  # the TTGIR of each kernel, to see what the software pipeliner made of its loads
                path = os.path.join(dump, f"{self.fn.__name__}-{self.label.replace(' ', '_')}.ttgir")
                with open(path, "w") as fh:
                    fh.write(kernel.asm["ttgir"])
            RESULTS.append(row)
            print(_format(row), flush=True)

        return run


def _format(row: dict) -> str:
    flags = ",".join(
        k.lower()
        for k in (
            "TMA",
            "WARP_SPECIALIZE",
            "SOFTCAP",
            "DROPOUT",
            "VARLEN",
            "ALIBI",
            "SPARSE",
            "BIAS_GRAD",
            "ELEMENTWISE",
        )
        if row.get(k)
    )
    return (
        f"{row['kernel']:<38} {row['case']:<28} M{row.get('BLOCK_M', '-'):>4} N{row.get('BLOCK_N', '-'):>4} "
        f"w{row['warps']} s{row['stages']} regs {row['regs']:>3} stack {row['stack']:>4} "
        f"ldl/stl {row['ldl_stl']:>3} "
        f"smem {row['shared'] // 1024:>3}KB hgmma {row['hgmma']:>3} qgmma {row['qgmma']:>3} hmma {row['hmma']:>3} "
        f"utma {row['tma']:>2} "
        f"{row['seconds']:>5}s {flags}"
    )


def _shim(arch: int, label: str):
    fwd = runtime.kernels().forward
    bwd = runtime.kernels().backward
    fwd_mod = types.SimpleNamespace(attention_forward_kernel=_Compiler(fwd.attention_forward_kernel, arch, label))
    bwd_mod = types.SimpleNamespace(
        attention_backward_preprocess_kernel=_Compiler(bwd.attention_backward_preprocess_kernel, arch, label),
        attention_backward_dkdv_kernel=_Compiler(bwd.attention_backward_dkdv_kernel, arch, label),
        attention_backward_dq_kernel=_Compiler(bwd.attention_backward_dq_kernel, arch, label),
    )
    real_mods = runtime.kernels().mods
    mods = types.SimpleNamespace(  # no device to run the probe on: translate only, the compile says the rest
        translated=lambda fn, argument, device: None if fn is None else real_mods._rebound(fn, real_mods)
    )
    dec = runtime.kernels().decode
    dec_mod = types.SimpleNamespace(**{name: _Compiler(getattr(dec, name), arch, label) for name in DECODE_KERNELS})
    kernels = runtime.Kernels(fwd_mod, bwd_mod, mods, dec_mod)
    return types.SimpleNamespace(kernels=lambda: kernels, interpreting=lambda: True)


DECODE_KERNELS = ("kv_append_kernel", "kv_decode_kernel", "kv_combine_kernel")


def run_decode(arch: int, label: str, head_dim: int = 128, splits: int = 4, knobs: dict | None = None,
               **options) -> None:  # fmt: skip
    """Compile the KV-cache kernels of a bf16 call: batch 16, GQA 32/8, 4096 keys, one new token;
    ``options`` are :func:`flash.attention_with_kvcache`'s (``page_size`` makes the cache paged),
    ``knobs`` change the table's configuration."""
    from flash import heuristics
    from flash.backend import DecodeArgs
    from flash.heuristics import decode as decode_heuristics
    from flash.kvspec import build_kv_spec
    from flash_triton import decode

    batch, heads_q, heads_kv, capacity = 16, 32, 8, 4096
    page = options.pop("page_size", None)
    cache_dtype = options.pop("cache_dtype", torch.bfloat16)
    rows = (batch * capacity // page, page) if page else (batch, capacity)
    k_cache, v_cache = (torch.empty(*rows, heads_kv, head_dim, dtype=cache_dtype) for _ in range(2))
    q = torch.empty(batch, options.pop("seqlen_q", 1), heads_q, head_dim, dtype=torch.bfloat16)
    k = v = torch.empty(batch, q.shape[1], heads_kv, head_dim, dtype=torch.bfloat16)
    lengths = torch.zeros(batch, dtype=torch.int32)
    table = torch.zeros(batch, capacity // page, dtype=torch.int32) if page else None
    if cache_dtype != torch.bfloat16:
        options.update(k_descale=torch.ones(batch, heads_kv), v_descale=torch.ones(batch, heads_kv))
    if options.pop("rotary", False):
        options.update(rotary_cos=torch.ones(capacity, head_dim // 2), rotary_sin=torch.zeros(capacity, head_dim // 2))
    if options.pop("sinks", False):
        options["sinks"] = torch.zeros(heads_q)
    spec = build_kv_spec(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table, num_splits=splits,
                         **{n: o for n, o in options.items() if n not in ("k_descale", "v_descale", "rotary_cos",
                                                                        "rotary_sin", "sinks")},
                         **{n: o for n, o in options.items() if n in ("k_descale", "v_descale", "rotary_cos",
                                                                    "rotary_sin", "sinks")})  # fmt: skip
    spec = __import__("dataclasses").replace(spec, device=torch.device("cuda"))
    config = heuristics.lookup(TritonBackend(), f"sm_{arch}", "bf16", head_dim, spec.causal, "decode").config
    config = KernelConfig.from_json({**config.to_json(), **(knobs or {})})
    del decode_heuristics
    out = torch.empty_like(q)
    lse = torch.empty(spec.lse_shape(), dtype=torch.float32)
    named = {n: options.get(n) for n in ("k_descale", "v_descale", "rotary_cos", "rotary_sin", "sinks")}
    args = DecodeArgs(q, k_cache, v_cache, lengths, out, lse, k=k, v=v, block_table=table, **named)
    real = decode.runtime
    decode.runtime = _shim(arch, label)
    try:
        decode.decode(spec, args, config)
    except Exception as error:
        print(f"FAILED {label}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    finally:
        decode.runtime = real


def decode_matrix(arch: int) -> int:
    """The KV-cache kernels with every option once, with the table's configurations."""
    run_decode(arch, "decode d128 4 splits")
    run_decode(arch, "decode d128 1 split", splits=1)
    run_decode(arch, "decode d64", head_dim=64)
    run_decode(arch, "decode d256", head_dim=256)
    run_decode(arch, "decode paged 16", page_size=16)
    run_decode(arch, "decode paged 64 rotary", page_size=64, rotary=True)
    run_decode(arch, "decode fp8 e4m3", cache_dtype=torch.float8_e4m3fn)
    run_decode(arch, "decode window sinks", window=(1000, 0), sink_tokens=4, sinks=True, causal=True)
    run_decode(arch, "decode 8 tokens softcap", seqlen_q=8, causal=True, softcap=30.0)
    return 0


#: The paged layouts :func:`decode_paged` compares with the contiguous cache: page sizes below, at and
#: above the 64-key tile, and one that is not a power of two (the per-key path).
PAGED_CASES = {
    "contiguous": {},
    "paged 1": {"page_size": 1},
    "paged 16": {"page_size": 16},
    "paged 64": {"page_size": 64},
    "paged 256": {"page_size": 256},
    "paged 48 (per key)": {"page_size": 48},
}


def decode_paged(arch: int) -> int:
    """The decoding kernel's unmasked tile loop, per thread, for each of :data:`PAGED_CASES` (d128):
    what a paged tile costs against a contiguous one (:func:`ptx_loops`)."""
    for label, options in PAGED_CASES.items():
        run_decode(arch, label, **options)
    print(f"{'unmasked loop, per thread':<28} {'SASS':>5} {'PTX':>5} {'K/V 16B':>7} {'table 4B':>8} {'ld':>3} "
          f"{'groups':>6} {'wait':>4} {'div/rem':>7} {'mul64':>5}")  # fmt: skip
    for row in RESULTS:
        if row["kernel"] == "kv_decode_kernel" and len(row["loops"]) == 3:
            loop = row["loops"][1]  # masked edge, unmasked run, masked edge
            cells = (row["sass_loops"][1], loop["instructions"], loop["copies_16B"], loop["copies_4B"],
                     loop["ld_global"], loop["groups"], loop["wait_group"], loop["div_rem"], loop["mul64"])  # fmt: skip
            print(f"{row['case']:<28} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, (5, 5, 7, 8, 3, 6, 4, 7, 5))))
    return 0


def run_case(arch, dtype, head_dim, causal, seqlen, pass_, config, label, **opt):
    heads = max(1, 2048 // head_dim)
    shape = (2, seqlen, heads, head_dim)
    q, k, v = (torch.empty(shape, dtype=dtype) for _ in range(3))
    make_masks = opt.pop("masks", None)
    tensors = make_masks(shape) if make_masks else {}
    spec = build_spec(q, k, v, causal=causal, **opt, **tensors)
    masks = CallMasks(**tensors).tensors()
    real = launch.runtime
    launch.runtime = _shim(arch, label)
    try:
        if pass_ == "forward":
            out = torch.empty(q.shape, dtype=spec.out_dtype)
            lse = torch.empty(spec.lse_shape(), dtype=torch.float32)
            args = ForwardArgs(
                canonical(q, spec),
                canonical(k, spec),
                canonical(v, spec),
                canonical(out, spec),
                canonical_lse(lse, spec),
                masks=masks,
            )
            launch.forward(spec, args, config)
        else:
            out, dout = torch.empty_like(q), torch.empty_like(q)
            lse = torch.empty(spec.lse_shape(), dtype=torch.float32)
            grads = [torch.empty_like(t) for t in (q, k, v)]
            c = [canonical(t, spec) for t in (q, k, v, out)]
            dbias = None
            if spec.mask is not None and spec.mask.requires_grad:
                dbias = torch.empty(2, heads, seqlen, seqlen, dtype=torch.float32)
            args = BackwardArgs(
                *c,
                canonical_lse(lse, spec),
                canonical(dout, spec),
                *[canonical(g, spec) for g in grads],
                masks=masks,
                dbias=dbias,
            )
            launch.backward(spec, args, config)
    except Exception as error:  # report and go on: the point is to see every case
        print(f"FAILED {label}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    finally:
        launch.runtime = real


def run_varlen(arch, dtype, head_dim, pass_, config, label, **opt):
    lens = [100, 3, 1000]
    cu = torch.tensor([0, 100, 103, 1103], dtype=torch.int32)
    heads = 4
    q, k, v = (torch.empty(1103, heads, head_dim, dtype=dtype) for _ in range(3))
    spec = build_spec(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens), **opt)
    real = launch.runtime
    launch.runtime = _shim(arch, label)
    try:
        lse = torch.empty(spec.lse_shape(), dtype=torch.float32)
        out = torch.empty_like(q)
        if pass_ == "forward":
            launch.forward(
                spec,
                ForwardArgs(*(canonical(t, spec) for t in (q, k, v, out)), canonical_lse(lse, spec), cu, cu),
                config,
            )
        else:
            grads = [canonical(torch.empty_like(t), spec) for t in (q, k, v)]
            launch.backward(
                spec,
                BackwardArgs(
                    *(canonical(t, spec) for t in (q, k, v, out)),
                    canonical_lse(lse, spec),
                    canonical(torch.empty_like(q), spec),
                    *grads,
                    cu,
                    cu,
                ),
                config,
            )
    except Exception as error:
        print(f"FAILED {label}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    finally:
        launch.runtime = real


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch_mods.tanh(score / 30.0)


def _softcap_grad(score, b, h, q_idx, kv_idx):
    t = torch_mods.tanh(score / 30.0)
    return 1.0 - t * t


def _prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < 256)


#: The mask options of the issue's benchmark set, each as a factory of a call's tensors from q's shape.
MASK_CASES = {
    "bool mask": lambda shape: {"attn_mask": torch.ones(shape[0], 1, shape[1], shape[1], dtype=torch.bool)},
    "padding mask": lambda shape: {"attn_mask": torch.ones(shape[0], 1, 1, shape[1], dtype=torch.bool)},
    "bias grad": lambda shape: {"attn_mask": torch.zeros(1, shape[2], shape[1], shape[1], requires_grad=True)},
    "alibi": lambda shape: {"alibi_slopes": torch.ones(shape[2])},
    "score_mod": lambda shape: {"score_mod": _softcap, "score_mod_grad": _softcap_grad},
    "mask_mod": lambda shape: {"mask_mod": _prefix_lm},
    "block mask": lambda shape: {
        "block_mask": BlockMask.from_mask_mod(_prefix_lm, batch=None, heads=None, seqlen_q=shape[1], seqlen_k=shape[1])
    },
    "document ids": lambda shape: {"block_mask": BlockMask.from_document_ids(torch.arange(shape[1]) // 200)},
    "document ids (split)": lambda shape: {  # a document in two runs: partial tiles compare ids
        "block_mask": BlockMask.from_document_ids(torch.arange(shape[1]) // 200 % 3)
    },
}


def masks_matrix(arch: int) -> int:
    """Every mask option once, d128 bf16, with the table's configuration."""
    from flash import heuristics

    for name, make in MASK_CASES.items():
        for pass_ in ("forward", "backward"):
            config = heuristics.lookup(TritonBackend(), f"sm_{arch}", "bf16", 128, False, pass_).config
            run_case(arch, torch.bfloat16, 128, False, 1024, pass_, config, name, masks=make)
    return 0


def matrix(arch: int) -> int:
    """Every option once (or a few times), each with the table's configuration for its class."""
    from flash import heuristics

    def cfg(dtype, head_dim, causal, pass_):
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        return heuristics.lookup(TritonBackend(), f"sm_{arch}", name, head_dim, causal, pass_).config

    cases = []
    for head_dim in (16, 40, 64, 80, 96, 128, 160, 192, 256):
        cases.append((torch.bfloat16, head_dim, True, {}))
    cases += [
        (torch.float16, 128, False, {}),
        (torch.bfloat16, 128, False, {"window": (256, 0)}),
        (torch.bfloat16, 64, False, {"window": (100, 50)}),
        (torch.bfloat16, 128, True, {"softcap": 30.0}),
        (torch.bfloat16, 128, False, {"dropout_p": 0.1, "dropout_seed": 3}),
        (torch.bfloat16, 128, True, {"deterministic": True}),
    ]
    for dtype, head_dim, causal, opt in cases:
        for pass_ in ("forward", "backward"):
            label = f"{str(dtype)[6:]} d{head_dim} {'causal ' if causal else ''}{' '.join(opt)}"
            run_case(arch, dtype, head_dim, causal, 1024, pass_, cfg(dtype, head_dim, causal, pass_), label, **opt)
    for pass_ in ("forward", "backward"):
        run_varlen(
            arch, torch.bfloat16, 128, pass_, cfg(torch.bfloat16, 128, True, pass_), "varlen d128 causal", causal=True
        )
    return fp8_matrix(arch)


def fp8_matrix(arch: int) -> int:
    """fp8 inputs (forward only, per-head descale), with the configurations the table gives them
    (its bf16 entries)."""
    from flash import heuristics

    e4m3 = [(torch.float8_e4m3fn, d, causal) for d in (64, 128, 256) for causal in (False, True)]
    for dtype, head_dim, causal in [*e4m3, (torch.float8_e5m2, 128, False)]:
        config = heuristics.lookup(TritonBackend(), f"sm_{arch}", "fp8", head_dim, causal, "forward").config
        label = f"{str(dtype)[6:]} d{head_dim}{' causal' if causal else ''}"
        run_case(arch, dtype, head_dim, causal, 1024, "forward", config, label)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--passes", default="forward,backward")
    parser.add_argument(
        "--config", action="append", default=[], help="pass:json config to compile instead of the table's (repeatable)"
    )
    parser.add_argument("--decode", action="store_true", help="compile the KV-cache kernels with every option")
    parser.add_argument(
        "--decode-paged", action="store_true", help="the decoding loop's per-tile costs, contiguous vs paged layouts"
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="compile every feature (dtypes, fp8, odd head dims, masks, softcap, dropout, varlen, "
        "GQA, layouts, deterministic) with the table's configurations",
    )
    parser.add_argument("--masks", action="store_true", help="compile every mask option (attn_mask, ALiBi, mods...)")
    parser.add_argument("--fp8", action="store_true", help="compile the forward for fp8 inputs (e4m3, e5m2)")
    args = parser.parse_args(argv)
    import json

    if args.matrix:
        return matrix(args.arch)
    if args.fp8:
        return fp8_matrix(args.arch)
    if args.masks:
        return masks_matrix(args.arch)
    if args.decode:
        return decode_matrix(args.arch)
    if args.decode_paged:
        return decode_paged(args.arch)

    from flash import heuristics

    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    for head_dim in [int(x) for x in args.head_dims.split(",")]:
        for causal in causals:
            for pass_ in args.passes.split(","):
                configs = [
                    KernelConfig.from_json(json.loads(c.split(":", 1)[1]))
                    for c in args.config
                    if c.split(":", 1)[0] == pass_
                ]
                if not configs:
                    key = heuristics.lookup(TritonBackend(), f"sm_{args.arch}", "bf16", head_dim, causal, pass_)
                    configs = [key.config]
                for config in configs:
                    label = f"bf16 d{head_dim} {'causal' if causal else 'full'}"
                    run_case(args.arch, torch.bfloat16, head_dim, causal, 1024, pass_, config, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
