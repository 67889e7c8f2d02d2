"""The ``triton`` backend: what it supports, and the calls into the kernels.

Loading this module imports neither triton nor any kernel (``import flash`` and the registry's
entry-point load stay light); :mod:`flash_triton.launch` and the kernel modules load on the
first forward or backward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from flash import heuristics
from flash.backend import DECODE_FEATURES, Backend, BackwardArgs, DecodeArgs, ForwardArgs, Limits, Pass, Support
from flash.kvspec import KVCacheSpec
from flash.spec import AttentionSpec
from flash.support import device_capability
from flash_triton import runtime
from flash_triton._version import __version__

DTYPES = frozenset({torch.float16, torch.bfloat16})
#: The forward also takes fp8 inputs (with their descale factors; fp8 attention has no backward).
FORWARD_DTYPES = DTYPES | {torch.float8_e4m3fn, torch.float8_e5m2}
FEATURES = frozenset(
    {"causal", "window", "softcap", "varlen", "gqa", "dropout", "deterministic", "sinks", "sink_tokens"}
    | {"attn_mask", "attn_bias", "attn_bias_grad", "alibi", "block_mask", "score_mod", "mask_mod"}
    | {"key_padding", "key_intervals", "block_sparse"}
)
#: CUDA limits grid dimensions y and z (heads, batch) to 65535; tile offsets inside a kernel are
#: int32, so a token stride of 2**23 elements or more could overflow them.
LIMITS = Limits(batch=65535, heads=65535, token_stride=2**23 - 1)
#: The KV-cache kernels' grid: splits x (KV heads x row blocks) x sequences; cache offsets are 64-bit
#: but a tile's row offsets from its base are int32 (tiles of at most 256 keys).
DECODE_LIMITS = Limits(batch=65535, heads=65535, token_stride=2**23 - 1)
#: CUDA's limit on a grid's second and third dimensions.
GRID_LIMIT = 65535
#: fp8 conversions in registers and fp8 tensor-core products need Ada or Hopper.
FP8_CAPABILITY = (8, 9)
#: (block_m, block_n) tried by autotuning.
TUNING_TILES = ((64, 64), (64, 128), (128, 64), (128, 128))


@functools.lru_cache(maxsize=1)
def _gpu_reasons() -> tuple[str, ...]:
    if not torch.cuda.is_available():
        return ("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU in Triton's interpreter)",)
    if torch.version.hip is not None:
        return ("ROCm GPUs are not supported (the kernels are written and tuned for NVIDIA GPUs)",)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        name = torch.cuda.get_device_name()
        return (f"GPU {name} is sm_{major}{minor}; the kernels need sm_80 (Ampere) or newer",)
    return ()


def _devices(interpreting: bool) -> frozenset[str]:
    # Under Triton's interpreter the kernels run on CPU tensors too.
    return frozenset({"cuda", "cpu"}) if interpreting else frozenset({"cuda"})


@functools.lru_cache(maxsize=4)
def _support(interpreting: bool, pass_: Pass) -> Support:
    dtypes = FORWARD_DTYPES if pass_ == "forward" else DTYPES
    # fp8 forwards store out in the dtype asked for (the epilogue casts to the output pointer's type).
    features = FEATURES | {"fp8", "out_dtype"} if pass_ == "forward" else FEATURES
    return Support(
        dtypes=dtypes, features=features, devices=_devices(interpreting), min_capability=(8, 0), limits=LIMITS
    )


@functools.lru_cache(maxsize=2)
def _decode_support(interpreting: bool) -> Support:
    devices = _devices(interpreting)
    return Support(
        dtypes=DTYPES, features=DECODE_FEATURES, devices=devices, min_capability=(8, 0), limits=DECODE_LIMITS
    )


class TritonBackend(Backend):
    """FlashAttention forward and backward written in Triton, tuned for H100/H200."""

    name = "triton"
    version = __version__
    priority = 100

    @property
    def forward_support(self) -> Support:  # type: ignore[override]
        return _support(runtime.interpreting(), "forward")

    @property
    def backward_support(self) -> Support:  # type: ignore[override]
        return _support(runtime.interpreting(), "backward")

    @property
    def decode_support(self) -> Support:  # type: ignore[override]
        return _decode_support(runtime.interpreting())

    def decode_extra_reasons(self, spec: KVCacheSpec) -> list[str]:
        from flash.heuristics import decode as decode_heuristics
        from flash_triton.decode import MIN_ROWS, row_block

        out = []
        found = device_capability(spec.device)
        if spec.is_fp8 and found is not None and found < FP8_CAPABILITY:
            out.append(f"fp8 caches need sm_89 or newer ({spec.device} is sm_{found[0]}{found[1]})")
        rows = spec.group_size * spec.seqlen_q
        try:
            block = row_block(spec, decode_heuristics.config_for(self, spec))
        except LookupError:  # a dtype the table does not cover is refused by the declaration already
            block = MIN_ROWS
        blocks = -(-rows // block) * spec.heads_kv
        if blocks > GRID_LIMIT:  # the grid's second dimension: KV heads x row blocks
            out.append(f"{spec.heads_kv} KV heads x {rows} rows (GQA group x new tokens) exceed the kernel's grid")
        return out

    def unavailable_reasons(self) -> list[str]:
        if not runtime.triton_installed():
            return ["triton is not installed (pip install 'triton>=3.2')"]
        mismatch = runtime.mode_mismatch()
        if mismatch:
            return [mismatch]
        if runtime.interpreting():
            return []
        return list(_gpu_reasons())

    def extra_reasons(self, spec: AttentionSpec, pass_: Pass) -> list[str]:
        if pass_ == "backward" and spec.score_mod is not None and spec.score_mod_grad is None:
            return ["score_mod without score_mod_grad (the kernels need d score_mod / d score)"]
        found = device_capability(spec.device)
        if spec.is_fp8 and found is not None and found < FP8_CAPABILITY:
            return [f"fp8 inputs need sm_89 or newer ({spec.device} is sm_{found[0]}{found[1]})"]
        return []

    def heuristics_rows(self) -> list[dict[str, Any]]:
        return heuristics.rows_from_json("flash_triton", "heuristics.json")

    def shared_memory_row(self, head_dim: int) -> int:
        from flash_triton.launch import padded_head_dim

        return padded_head_dim(head_dim)

    def runtime_versions(self) -> str:
        import triton

        return f"triton {triton.__version__}"

    def tuning_candidates(self, spec: AttentionSpec, pass_: Pass) -> list[heuristics.KernelConfig]:
        """Tile shapes, warps and stages around the table's entry (FLASH_AUTOTUNE=1); none in the
        interpreter, whose timings mean nothing."""
        if spec.device.type != "cuda":
            return []
        arch = heuristics.arch_of(spec.device)
        base = heuristics.lookup(self, arch, heuristics.dtype_name(spec.dtype), spec.head_dim, spec.causal, pass_)
        return [
            dataclasses.replace(base.config, block_m=m, block_n=n, num_warps=warps, num_stages=stages)
            for m, n in TUNING_TILES
            for warps in (4, 8)
            for stages in (2, 3)
        ]

    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: heuristics.KernelConfig) -> None:
        from flash_triton import launch

        launch.forward(spec, args, config)

    def backward(self, spec: AttentionSpec, args: BackwardArgs, config: heuristics.KernelConfig) -> None:
        from flash_triton import launch

        launch.backward(spec, args, config)

    def decode(self, spec: KVCacheSpec, args: DecodeArgs, config: heuristics.KernelConfig) -> None:
        from flash_triton import decode

        decode.decode(spec, args, config)
