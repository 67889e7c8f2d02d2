"""Rotary position embeddings (RoPE), as the KV-cache call applies them to new queries and keys.

The first ``rotary_dim = 2 * rotary_cos.shape[1]`` elements of a head are rotated in pairs by the
angle of the token's position ``p``: pair ``m`` is rotated by the angle whose cosine and sine are
``rotary_cos[p, m]`` and ``rotary_sin[p, m]``; the other elements pass unchanged. The pairs are
``(x[m], x[m + rotary_dim / 2])`` (GPT-NeoX, ``interleaved=False``) or ``(x[2m], x[2m + 1])``
(GPT-J, ``interleaved=True``); each becomes ``(a cos - b sin, b cos + a sin)``. The arithmetic is
float32 (float64 for float64 inputs), rounded once to the tensor's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate(
    x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """``x`` (batch, tokens, heads, head_dim) rotated at ``positions`` (batch, tokens), which must
    index rows of ``cos``/``sin`` (callers clamp them); returned in ``dtype`` (default: ``x``'s),
    so a caller that quantises the result rounds only once."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[1]
    c = cos.to(compute)[positions][:, :, None, :]  # (batch, tokens, 1, half)
    s = sin.to(compute)[positions][:, :, None, :]
    head = x[..., : 2 * half].to(compute)
    if interleaved:
        a, b = head[..., 0::2], head[..., 1::2]
        turned = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = head[..., :half], head[..., half:]
        turned = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    dtype = x.dtype if dtype is None else dtype
    return torch.cat((turned.to(dtype), x[..., 2 * half :].to(dtype)), dim=-1)
