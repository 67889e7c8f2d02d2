"""``flash.nn.MultiheadAttention``: the usual projection + attention + output block on flash.

A drop-in for :class:`torch.nn.MultiheadAttention`: same constructor arguments,
same parameter names (a state dict saved from one loads into the other), same
input layouts and mask conventions. The attention itself runs through
:func:`flash.scaled_dot_product_attention`, so every mask (``key_padding_mask``,
``attn_mask``, causal) runs on the FlashAttention kernels, and the projected heads are
used in place: the (batch, seqlen, heads, head_dim) view of a projection needs no copy.

Differences: it never forms the attention weights, so ``need_weights`` must be
False (the default here) and the second returned value is None; ``is_causal=True``
works without an ``attn_mask``; ``add_bias_kv`` and ``add_zero_attn`` are not
supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import flash
from flash.errors import InvalidInputError


class MultiheadAttention(nn.Module):
    """Multi-head attention with flash inside. See :class:`torch.nn.MultiheadAttention` for the arguments."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise InvalidInputError("embed_dim", f"a positive multiple of num_heads ({num_heads})", str(embed_dim))
        if add_bias_kv or add_zero_attn:
            name = "add_bias_kv" if add_bias_kv else "add_zero_attn"
            raise InvalidInputError(name, "False (not supported by flash.nn.MultiheadAttention)", "True")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The same initialisation as torch.nn.MultiheadAttention.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            q, k, v = self.in_proj_weight.chunk(3)
            return q, k, v
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _sdpa_mask(
        self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, batch: int, q_len: int, k_len: int, dtype
    ) -> Tensor | None:
        """torch MHA's masks (bool True = masked out, float = added) as one SDPA mask, never expanded.

        Boolean masks stay boolean (True: visible), so the kernels skip the tiles they hide; a
        padding mask alone becomes (batch, 1, 1, k_len), which skips the padded key blocks.
        """
        masks = []
        if attn_mask is not None:
            masks.append(attn_mask.reshape(batch, self.num_heads, q_len, k_len) if attn_mask.dim() == 3 else attn_mask)
        if key_padding_mask is not None:
            masks.append(key_padding_mask[:, None, None, :])
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            for m in masks[1:]:
                keep = keep & ~m
            return keep
        added = [m.to(dtype) if m.dtype != torch.bool else torch.zeros((), dtype=dtype).masked_fill(m, float("-inf"))
                 for m in masks]  # fmt: skip
        total = added[0]
        for m in added[1:]:
            total = total + m
        return total

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Attend from ``query`` to ``key``/``value``; returns ``(output, None)``."""
        if need_weights:
            raise InvalidInputError("need_weights", "False: flash never forms the attention weights", "True")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # (seqlen, batch, embed) -> (batch, seqlen, embed) views
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
        w_q, w_k, w_v = self._projection_weights()
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        heads = (self.num_heads, self.head_dim)
        q = F.linear(query, w_q, b_q).unflatten(-1, heads).transpose(1, 2)  # (batch, heads, seqlen, head_dim)
        k = F.linear(key, w_k, b_k).unflatten(-1, heads).transpose(1, 2)
        v = F.linear(value, w_v, b_v).unflatten(-1, heads).transpose(1, 2)
        mask = self._sdpa_mask(key_padding_mask, attn_mask, batch, q_len, k_len, q.dtype)
        out = flash.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), None
