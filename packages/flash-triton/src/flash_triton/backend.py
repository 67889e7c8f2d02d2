"""The ``triton`` backend: what it supports, and the calls into the kernels.

Loading this module imports neither triton nor any kernel (``import flash`` and the registry's
entry-point load stay light); :mod:`flash_triton.launch` and the kernel modules load on the
first forward or backward.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from flash import heuristics
from flash.backend import Backend, BackwardArgs, ForwardArgs, reasons_for_unsupported
from flash.spec import AttentionSpec
from flash_triton import runtime
from flash_triton._version import __version__

DTYPES = (torch.float16, torch.bfloat16)
FEATURES = frozenset({"causal", "window", "softcap", "varlen", "gqa", "dropout", "deterministic"})
HEAD_DIMS = range(1, 257)
#: CUDA limits grid dimensions y and z (heads, batch) to 65535.
MAX_GRID_YZ = 65535
#: (block_m, block_n) tried by autotuning.
TUNING_TILES = ((64, 64), (64, 128), (128, 64), (128, 128))
#: Tile offsets inside a kernel are int32: a token stride above this could overflow them.
MAX_TOKEN_STRIDE = 2**23


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


class TritonBackend(Backend):
    """FlashAttention forward and backward written in Triton, tuned for H100/H200."""

    name = "triton"
    version = __version__
    priority = 100

    def unavailable_reasons(self) -> list[str]:
        if not runtime.triton_installed():
            return ["triton is not installed (pip install 'triton>=3.2')"]
        mismatch = runtime.mode_mismatch()
        if mismatch:
            return [mismatch]
        if runtime.interpreting():
            return []
        return list(_gpu_reasons())

    def _reasons(self, spec: AttentionSpec) -> list[str]:
        device_types = ("cuda", "cpu") if runtime.interpreting() else ("cuda",)
        reasons = reasons_for_unsupported(
            spec, dtypes=DTYPES, features=FEATURES, head_dims=HEAD_DIMS, device_types=device_types
        )
        if spec.batch > MAX_GRID_YZ:
            reasons.append(f"batch {spec.batch} above {MAX_GRID_YZ} (a CUDA grid dimension)")
        if spec.heads_q > MAX_GRID_YZ:
            reasons.append(f"{spec.heads_q} heads above {MAX_GRID_YZ} (a CUDA grid dimension)")
        if max(spec.q_strides[1], spec.k_strides[1], spec.v_strides[1]) >= MAX_TOKEN_STRIDE:
            reasons.append(f"a token stride of {MAX_TOKEN_STRIDE} elements or more (int32 tile offsets)")
        return reasons

    def forward_reasons(self, spec: AttentionSpec) -> list[str]:
        return self._reasons(spec)

    def backward_reasons(self, spec: AttentionSpec) -> list[str]:
        return self._reasons(spec)

    def tuning_candidates(self, spec: AttentionSpec, pass_: str) -> list[heuristics.KernelConfig]:
        """Tile shapes, warps and stages around the table's entry (FLASH_AUTOTUNE=1); none in the
        interpreter, whose timings mean nothing."""
        if spec.device.type != "cuda":
            return []
        base = heuristics.config_for(self, spec, pass_)  # type: ignore[arg-type]
        return [
            dataclasses.replace(base, block_m=m, block_n=n, num_warps=warps, num_stages=stages)
            for m, n in TUNING_TILES
            for warps in (4, 8)
            for stages in (2, 3)
        ]

    def forward(self, spec: AttentionSpec, args: ForwardArgs) -> None:
        from flash_triton import launch

        launch.forward(spec, args, heuristics.config_for(self, spec, "forward"))

    def backward(self, spec: AttentionSpec, args: BackwardArgs) -> None:
        from flash_triton import launch

        launch.backward(spec, args, heuristics.config_for(self, spec, "backward"))
