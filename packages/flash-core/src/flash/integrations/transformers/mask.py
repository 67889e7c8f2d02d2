"""The mask function registered with transformers' ``AttentionMaskInterface``.

transformers builds each layer's mask through the function registered under the attention
implementation's name; without one, a model gets no mask at all and padding would be lost. The
attention function expresses causality and sliding windows itself, so all it needs is which keys
are real tokens: this function returns the 2-D padding mask (``True`` = real), or ``None`` when
every key is real.

It also guards the patterns the attention function cannot express: transformers hands over the
mask *pattern* as a composition of its own mask functions, and any piece other than causal,
bidirectional, sliding-window and packed-sequence (which
:mod:`~flash.integrations.transformers.attention` reads from the position ids) raises
:class:`NotImplementedError`: chunked attention (Llama 4), ``block_sequence_ids``,
``or_mask_function``/``and_mask_function`` overlays (image tokens...), or anything unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

_MASKING = "transformers.masking_utils"
#: Pieces of transformers' mask functions whose meaning the attention function reproduces.
_EXPRESSIBLE = frozenset(
    {
        "causal_mask_function",
        "bidirectional_mask_function",
        "sliding_window_overlay.<locals>.inner_mask",
        "sliding_window_bidirectional_overlay.<locals>.inner_mask",
        "packed_sequence_mask_function.<locals>.inner_mask",
        # 5.24+: packed patterns read positions from position_ids; inside a packed sequence they
        # step by one, so distances, hence causal and window masks, are unchanged.
        "remap_positions_for_packed_sequence.<locals>.inner_mask",
        "padding_mask_function.<locals>.inner_mask",
        "and_masks.<locals>.and_mask",
        "add_offsets_to_mask_function.<locals>.inner_mask",
    }
)
#: Known pieces flash cannot express, and how to say so.
_NAMED = {
    "chunked_overlay.<locals>.inner_mask": "chunked attention (attention_chunk_size, as in Llama 4)",
    "blockwise_overlay.<locals>.inner_mask": "block_sequence_ids (bidirectional blocks)",
    "or_masks.<locals>.or_mask": "a mask widened by or_mask_function (e.g. bidirectional image tokens)",
}


def _pieces(function: object) -> Iterator[Callable[..., Any]]:
    """The function and every function its closure holds (transformers composes masks by closures)."""
    stack = [function]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif callable(item):
            yield item
            for cell in getattr(item, "__closure__", None) or ():
                stack.append(cell.cell_contents)


def check_mask_function(mask_function: object) -> None:
    """Raise :class:`NotImplementedError` unless every piece of ``mask_function`` is one the
    attention function expresses (causal, bidirectional, sliding window, packed sequences)."""
    for piece in _pieces(mask_function):
        name = getattr(piece, "__qualname__", type(piece).__name__)
        if getattr(piece, "__module__", None) == _MASKING and name in _EXPRESSIBLE:
            continue
        what = _NAMED.get(name, f"the mask function {getattr(piece, '__module__', '?')}.{name}")
        raise NotImplementedError(
            f"flash's transformers attention cannot express {what}; "
            "load this model with attn_implementation='sdpa' or 'eager'"
        )


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """What transformers passes to the attention function as ``attention_mask``.

    Returns the 2-D bool padding mask of the keys (its last ``kv_length`` columns), or ``None``
    when every key is a real token. A static cache's keys extend past the last query; a mask
    shorter than ``kv_length`` then tells the attention function which slots hold tokens. Asking
    whether the mask is all ones waits for the device once per model call (not per layer), as
    transformers' own flash-attention mask does.
    """
    if mask_function is not None:
        check_mask_function(mask_function)
    if attention_mask is not None:
        mask = attention_mask[:, -kv_length:]
        if mask.shape[1] == kv_length and bool(mask.all()):
            return None
        return mask
    # No padding; but a static cache has slots beyond the last query that hold no token yet.
    filled = q_offset + q_length - kv_offset
    filled = int(filled.item()) if isinstance(filled, Tensor) else int(filled)
    if filled >= kv_length:
        return None
    return torch.ones(batch_size, max(filled, 0), dtype=torch.bool, device=kwargs.get("device"))
