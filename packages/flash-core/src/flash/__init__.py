"""flash: exact FlashAttention with one API and interchangeable backends.

>>> import torch, flash
>>> q = k = v = torch.randn(1, 8, 2, 16)          # (batch, seqlen, heads, head_dim)
>>> flash.attention(q, k, v, causal=True).shape
torch.Size([1, 8, 2, 16])

Importing flash imports no backend: they load on first use, through the
``flash.backends`` entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flash import fp8, mods
from flash._version import __version__
from flash.api import (
    attention,
    attention_qkvpacked,
    backends,
    explain,
    register_backend,
    scaled_dot_product_attention,
    set_backend_priority,
)
from flash.backend import PLUGIN_API_VERSION, Backend, BackwardArgs, DecodeArgs, ForwardArgs
from flash.block_mask import BlockMask
from flash.dispatch import use_backend
from flash.errors import BackendError, FlashError, InvalidInputError, NoBackendError
from flash.inference import attention_with_kvcache, explain_kvcache
from flash.kvspec import KVCacheSpec, build_kv_spec
from flash.merge import merge_states
from flash.padding import cu_seqlens_from_position_ids, pad, select_tokens, unpad, unpad_indices
from flash.spec import AttentionSpec, build_spec

if TYPE_CHECKING:
    from flash import distributed, nn

__all__ = [
    "PLUGIN_API_VERSION",
    "AttentionSpec",
    "Backend",
    "BackendError",
    "BackwardArgs",
    "BlockMask",
    "DecodeArgs",
    "FlashError",
    "ForwardArgs",
    "InvalidInputError",
    "KVCacheSpec",
    "NoBackendError",
    "__version__",
    "attention",
    "attention_qkvpacked",
    "attention_with_kvcache",
    "backends",
    "build_kv_spec",
    "build_spec",
    "cu_seqlens_from_position_ids",
    "distributed",
    "explain",
    "explain_kvcache",
    "fp8",
    "merge_states",
    "mods",
    "nn",
    "pad",
    "register_backend",
    "scaled_dot_product_attention",
    "select_tokens",
    "set_backend_priority",
    "unpad",
    "unpad_indices",
    "use_backend",
]


def __getattr__(name: str) -> Any:
    # torch.nn modules and the torch.distributed ring load only for users who want them
    if name in ("nn", "distributed"):
        import importlib

        return importlib.import_module(f"flash.{name}")
    raise AttributeError(f"module 'flash' has no attribute {name!r}")
