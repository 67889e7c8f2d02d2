"""Validation of the mask and score arguments of a call: ``attn_mask``, ``alibi_slopes``,
``block_mask``, ``score_mod``/``score_mod_grad`` and ``mask_mod``.

Each check raises :class:`~flash.errors.InvalidInputError` naming the argument before any kernel
runs, and describes what it accepted as hashable data for the spec (shapes, kinds and function
identities, never tensor values).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from flash.block_mask import BlockMask, BlockMaskInfo
from flash.errors import InvalidInputError

Alibi = Literal["none", "head", "batch_head"]
#: Float dtypes an additive ``attn_mask`` may have (kernels read it as float32).
BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MaskInfo:
    """What a spec records of a dense ``attn_mask``: its kind and broadcast shape, never its values.

    ``shape`` is the mask viewed as (batch|1, heads|1, seqlen_q|1, seqlen_k|1).
    """

    kind: Literal["bool", "bias"]
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    requires_grad: bool  # an additive mask whose gradient the backward must produce


@dataclass(frozen=True)
class MaskArguments:
    """The spec fields of the mask and score arguments."""

    mask: MaskInfo | None = None
    alibi: Alibi = "none"
    block_mask: BlockMaskInfo | None = None
    score_mod: Callable[..., Any] | None = None
    score_mod_grad: Callable[..., Any] | None = None
    mask_mod: Callable[..., Any] | None = None


def mask4(mask: torch.Tensor) -> torch.Tensor:
    """An ``attn_mask`` of 2 to 4 dims as a 4-D view (size-1 leading dims added; no copy)."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


def _check_attn_mask(
    mask: object, batch: int, heads: int, seqlen_q: int, seqlen_k: int, device: torch.device, varlen: bool
) -> MaskInfo:
    if not isinstance(mask, torch.Tensor):
        raise InvalidInputError("attn_mask", "a torch.Tensor or None", type(mask).__name__)
    if varlen:
        raise InvalidInputError(
            "attn_mask", "None with cu_seqlens (a varlen batch has no dense score matrix)", "a tensor"
        )
    if mask.device != device:
        raise InvalidInputError("attn_mask", f"device {device} (same as q)", str(mask.device))
    if mask.dtype != torch.bool and mask.dtype not in BIAS_DTYPES:
        raise InvalidInputError("attn_mask", "dtype bool (True: visible) or a float dtype (added)", str(mask.dtype))
    want = (batch, heads, seqlen_q, seqlen_k)
    if not 2 <= mask.dim() <= 4:
        raise InvalidInputError("attn_mask", f"2 to 4 dims broadcastable to {want}", f"shape {tuple(mask.shape)}")
    shape = tuple(mask4(mask).shape)
    if any(n not in (1, w) for n, w in zip(shape, want)):
        raise InvalidInputError("attn_mask", f"a shape broadcastable to {want}", f"shape {tuple(mask.shape)}")
    kind: Literal["bool", "bias"] = "bool" if mask.dtype == torch.bool else "bias"
    grad = kind == "bias" and mask.requires_grad and torch.is_grad_enabled()
    return MaskInfo(kind, mask.dtype, shape, grad)  # type: ignore[arg-type]


def _check_alibi(slopes: object, batch: int, heads: int, device: torch.device) -> Alibi:
    if not isinstance(slopes, torch.Tensor):
        raise InvalidInputError("alibi_slopes", "a torch.Tensor or None", type(slopes).__name__)
    if slopes.dtype != torch.float32:
        raise InvalidInputError("alibi_slopes", "dtype torch.float32", str(slopes.dtype))
    if slopes.device != device:
        raise InvalidInputError("alibi_slopes", f"device {device} (same as q)", str(slopes.device))
    if tuple(slopes.shape) == (heads,):
        return "head"
    if tuple(slopes.shape) == (batch, heads):
        return "batch_head"
    raise InvalidInputError("alibi_slopes", f"shape ({heads},) or ({batch}, {heads})", f"shape {tuple(slopes.shape)}")


def _check_function(name: str, fn: object, params: int, what: str) -> Callable[..., Any]:
    if not callable(fn):
        raise InvalidInputError(name, f"a function {what}", type(fn).__name__)
    try:
        inspect.signature(fn).bind(*range(params))
    except TypeError:
        raise InvalidInputError(name, f"a function {what} ({params} positional parameters)", repr(fn)) from None
    except ValueError:  # a builtin without a signature: the probe below says if it fits
        pass
    _probe(name, fn, params)
    return fn


def _probe(name: str, fn: Callable[..., Any], params: int) -> None:
    """Evaluate ``fn`` once on a 2 x 2 tile of torch tensors, so a broken body fails here, named."""
    b, h = torch.tensor(0), torch.tensor(0)
    q_idx, kv_idx = torch.arange(2)[:, None], torch.arange(2)[None, :]
    args = (b, h, q_idx, kv_idx) if params == 4 else (torch.zeros(2, 2), b, h, q_idx, kv_idx)
    try:
        out = fn(*args)
    except Exception as error:
        raise InvalidInputError(
            name, "a function of torch tensors (see flash.mods)", f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(out, torch.Tensor) or torch.broadcast_shapes(out.shape, (2, 2)) != (2, 2):
        raise InvalidInputError(name, "a tensor broadcastable to the score tile", type(out).__name__)
    if params == 4 and out.dtype != torch.bool:
        raise InvalidInputError(name, "a boolean result (True: visible)", str(out.dtype))
    if params == 5 and not out.is_floating_point():
        raise InvalidInputError(name, "a float result", str(out.dtype))


def _check_block_mask(
    block_mask: object, batch: int, heads: int, seqlen_q: int, seqlen_k: int, device: torch.device, varlen: bool
) -> BlockMaskInfo:
    if not isinstance(block_mask, BlockMask):
        raise InvalidInputError("block_mask", "a flash.BlockMask or None", type(block_mask).__name__)
    info = block_mask.info
    if varlen:
        raise InvalidInputError("block_mask", "None with cu_seqlens (block masks cover a padded batch)", "a BlockMask")
    if block_mask.device != device:
        raise InvalidInputError("block_mask", f"one built on device {device} (same as q)", str(block_mask.device))
    if (info.seqlen_q, info.seqlen_k) != (seqlen_q, seqlen_k):
        raise InvalidInputError(
            "block_mask", f"one built for seqlen {seqlen_q}x{seqlen_k}", f"{info.seqlen_q}x{info.seqlen_k}"
        )
    if info.batch not in (1, batch) or info.heads not in (1, heads):
        raise InvalidInputError(
            "block_mask",
            f"one built for batch 1|{batch} and heads 1|{heads}",
            f"batch {info.batch}, heads {info.heads}",
        )
    return info


def check_mask_arguments(
    *,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
    varlen: bool,
    attn_mask: object = None,
    alibi_slopes: object = None,
    block_mask: object = None,
    score_mod: object = None,
    score_mod_grad: object = None,
    mask_mod: object = None,
) -> MaskArguments:
    """Validate the mask and score arguments of one call (sizes are the problem's, heads the query heads)."""
    mask = None
    if attn_mask is not None:
        mask = _check_attn_mask(attn_mask, batch, heads, seqlen_q, seqlen_k, device, varlen)
    alibi: Alibi = "none" if alibi_slopes is None else _check_alibi(alibi_slopes, batch, heads, device)
    block = None
    if block_mask is not None:
        block = _check_block_mask(block_mask, batch, heads, seqlen_q, seqlen_k, device, varlen)
        if attn_mask is not None:
            raise InvalidInputError(
                "attn_mask", "None with a block_mask (build one BlockMask from the combined mask)", "a tensor"
            )
    score = None if score_mod is None else _check_function("score_mod", score_mod, 5, "(score, b, h, q_idx, kv_idx)")
    grad = None
    if score_mod_grad is not None:
        if score is None:
            raise InvalidInputError("score_mod_grad", "None without a score_mod", repr(score_mod_grad))
        grad = _check_function("score_mod_grad", score_mod_grad, 5, "(score, b, h, q_idx, kv_idx)")
    mask_fn = None if mask_mod is None else _check_function("mask_mod", mask_mod, 4, "(b, h, q_idx, kv_idx) -> bool")
    if mask_fn is not None and block is not None and block.mask_mod is not None and block.mask_mod is not mask_fn:
        raise InvalidInputError(
            "mask_mod", "None or the block_mask's own mask_mod (a block mask carries its mask)", repr(mask_fn)
        )
    if mask_fn is not None and block is not None and block.mask_mod is mask_fn:
        mask_fn = None  # the block mask applies it
    return MaskArguments(mask, alibi, block, score, grad, mask_fn)
