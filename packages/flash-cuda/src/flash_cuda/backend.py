"""The ``cuda`` backend: what it supports, and the forward launch.

Registered through the ``flash.backends`` entry point ``cuda = "flash_cuda.backend:CudaBackend"``.
Importing this module imports neither CuPy nor NVRTC: :meth:`CudaBackend.unavailable_reasons`
does, once, the first time dispatch asks.
"""

from __future__ import annotations

import functools

import torch

from flash import heuristics
from flash.backend import Backend, ForwardArgs, reasons_for_unsupported
from flash.spec import AttentionSpec
from flash_cuda import launch
from flash_cuda._version import __version__
from flash_cuda.candidates import CANDIDATES
from flash_cuda.variants import Variant, make_variant, mask_kind, nvrtc_arch

DTYPES = (torch.float16, torch.bfloat16)
#: Options of the spec this forward handles (dropout, softcap and fp8 are declared unsupported).
FEATURES = frozenset({"causal", "window", "gqa", "varlen", "deterministic"})
MIN_CAPABILITY = (8, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CudaBackend(Backend):
    """Raw CUDA C++ FlashAttention forward (mma.sync tensor cores), compiled at run time by NVRTC via CuPy."""

    name = "cuda"
    version = __version__
    priority = 80

    def unavailable_reasons(self) -> list[str]:
        try:
            import cupy
        except Exception as error:  # ImportError, or a CuPy that cannot find its CUDA libraries
            return [
                f"cupy not importable ({type(error).__name__}: {error}); "
                "install flash-cuda[cuda12] or flash-cuda[cuda13]"
            ]
        if not torch.cuda.is_available():
            return ["no CUDA GPU"]
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as error:
            return [f"cupy cannot use the CUDA driver ({type(error).__name__}: {error})"]
        capabilities = [_capability(i) for i in range(torch.cuda.device_count())]
        if all(c < MIN_CAPABILITY for c in capabilities):
            found = ", ".join(f"sm_{a}{b}" for a, b in capabilities)
            return [f"GPU too old ({found}): the kernel needs sm_80 or newer (cp.async, bf16 mma.sync)"]
        return []

    def forward_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = reasons_for_unsupported(spec, dtypes=DTYPES, features=FEATURES)
        if spec.device.type != "cuda":
            return reasons
        if torch.cuda.is_available():  # without a GPU, unavailable_reasons() already says why
            capability = _capability(_index(spec.device))
            if capability < MIN_CAPABILITY:
                reasons.append(f"{spec.device} is sm_{capability[0]}{capability[1]}; the kernel needs sm_80 or newer")
        if spec.head_dim % 8:
            reasons.append(f"head_dim {spec.head_dim} is not a multiple of 8 (rows move in 16-byte chunks)")
        if not spec.aligned16:
            reasons.append(
                "q/k/v pointers or strides are not multiples of 16 bytes (rows move in 16-byte cp.async chunks); "
                "call .contiguous()"
            )
        if max(spec.seqlen_q, spec.seqlen_k, spec.total_q, spec.total_k) > launch.MAX_SEQLEN:
            reasons.append(f"sequences longer than {launch.MAX_SEQLEN} tokens (32-bit index arithmetic)")
        elif launch.grid_size(spec, 16) > launch.MAX_GRID:
            reasons.append("more than 2**31 - 1 thread blocks")
        return reasons

    def backward_reasons(self, spec: AttentionSpec) -> list[str]:
        return ["no CUDA backward pass yet (another backend's backward pairs with this forward through the LSE)"]

    def tuning_candidates(self, spec: AttentionSpec, pass_: str) -> list[heuristics.KernelConfig]:
        """The spill-free tiles of the head-dim bucket (FLASH_AUTOTUNE=1); only the forward exists."""
        if pass_ != "forward":
            return []
        return list(CANDIDATES.get(heuristics.head_dim_bucket(spec.head_dim), []))

    def variant(self, spec: AttentionSpec) -> Variant:
        """The kernel variant that runs ``spec``: the heuristics table's tiles for this GPU, fitted to it."""
        index = _index(spec.device)
        config = heuristics.config_for(self, spec, "forward")
        mask = mask_kind(spec.mask_bounds, spec.masked)
        return _variant(config, spec.head_dim, spec.dtype == torch.bfloat16, mask, index)

    def forward(self, spec: AttentionSpec, args: ForwardArgs) -> None:
        launch.forward(spec, args, self.variant(spec))


@functools.lru_cache(maxsize=1024)
def _variant(config: heuristics.KernelConfig, head_dim: int, bf16: bool, mask: int, index: int) -> Variant:
    arch = nvrtc_arch(_capability(index))
    return make_variant(config, head_dim, bf16, mask, arch, smem_limit=_smem_optin(index))
