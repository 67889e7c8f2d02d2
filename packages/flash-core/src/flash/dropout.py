"""Attention dropout as a pure function of (seed, batch, head, query, key).

A kernel cannot share a random stream with the reference, so the mask is defined
by a counter-based hash that any backend can evaluate per element with 32-bit
integer arithmetic, and that forward and backward re-evaluate identically:

* ``fmix32`` is MurmurHash3's 32-bit finaliser;
* ``sequence = fmix32(seed_lo ^ fmix32(seed_hi ^ fmix32(batch)))``;
* ``row = fmix32(fmix32(sequence ^ head) ^ query)``;
* ``bits = fmix32(row ^ (key * 0x9E3779B1 mod 2**32))``;
* the element is kept iff ``bits >> 8 >= threshold(p) = floor(p * 2**24)``.

``batch`` is the sequence index (also for varlen), ``head`` the *query* head,
``query``/``key`` the positions inside the sequence. Kept probabilities are
scaled by ``1 / (1 - p)``; the LSE is that of the undropped softmax.
"""

from __future__ import annotations

from typing import overload

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


@overload
def fmix32(x: int) -> int: ...
@overload
def fmix32(x: torch.Tensor) -> torch.Tensor: ...


def fmix32(x: int | torch.Tensor) -> int | torch.Tensor:
    """MurmurHash3 finaliser on 32-bit values (Python ints or int64 tensors holding them)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32  # int64 products may wrap; the low 32 bits stay exact
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def random_seed() -> int:
    """A seed for one dropout call, drawn from PyTorch's default (CPU) generator, so that
    ``torch.manual_seed`` makes it reproducible; reading a CPU tensor never waits for a GPU."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def threshold(p: float) -> int:
    """Elements whose 24-bit draw is below this are dropped."""
    return int(p * (1 << 24))


def sequence_key(seed: int, batch: int) -> int:
    """The per-sequence hash every element of sequence ``batch`` starts from."""
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    return int(fmix32(seed_lo ^ int(fmix32(seed_hi ^ int(fmix32(batch))))))


def keep_mask(
    seed: int,
    batches: list[int],
    heads: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """Boolean mask (len(batches), heads, queries, keys): True where the element is kept."""
    seq = torch.tensor([sequence_key(seed, b) for b in batches], dtype=torch.int64, device=heads.device)
    head_h = fmix32(seq[:, None] ^ heads.to(torch.int64)[None, :])  # (B, H)
    row_h = fmix32(head_h[:, :, None] ^ queries.to(torch.int64)[None, None, :])  # (B, H, Q)
    key_h = (keys.to(torch.int64) * _GOLDEN) & _MASK32  # (K,)
    bits = fmix32(row_h[..., None] ^ key_h)
    return (bits >> 8) >= threshold(p)
