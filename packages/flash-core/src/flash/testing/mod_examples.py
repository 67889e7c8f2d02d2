"""Score and mask functions of the documentation's examples, shared by the conformance cases.

Each follows the :mod:`flash.mods` contract, so every backend that runs mods runs them, and the
oracle evaluates them densely in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flash import mods

SOFTCAP = 20.0
PREFIX = 8
WINDOW = 6
GLOBAL_TOKENS = 4
#: Tokens per block of block_pattern (a block mask of these blocks, or finer ones, has no partial block).
PATTERN_BLOCK = 128


def softcap(score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """tanh softcap as a score_mod: ``c * tanh(score / c)``."""
    return SOFTCAP * mods.tanh(score / SOFTCAP)


def softcap_grad(score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """Its derivative: ``1 - tanh(score / c)^2``."""
    t = mods.tanh(score / SOFTCAP)
    return 1.0 - t * t


def relative_bias(score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """A relative-position bias that differs per head."""
    return score - 0.05 * (h + 1) * mods.abs(q_idx - kv_idx)


def additive_grad(score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The derivative of any score_mod that only adds to the score: 1."""
    return score * 0.0 + 1.0


def prefix_lm(b, h, q_idx, kv_idx) -> torch.Tensor:
    """Prefix-LM: the first PREFIX tokens see each other, the rest is causal."""
    return (kv_idx <= q_idx) | (kv_idx < PREFIX)


def local_global(b, h, q_idx, kv_idx) -> torch.Tensor:
    """Causal sliding window of WINDOW keys plus GLOBAL_TOKENS tokens everyone sees."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx <= WINDOW) | (kv_idx < GLOBAL_TOKENS))


#: name: (score_mod, its derivative) or (mask_mod, None)
SCORE_MODS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor] | None]] = {
    "softcap": (softcap, softcap_grad),
    "softcap_autograd": (softcap, None),
    "relative_bias": (relative_bias, additive_grad),
}


def block_pattern(b, h, q_idx, kv_idx) -> torch.Tensor:
    """A BigBird-like block pattern: a query block sees its own key block, the first one and every third
    diagonal's (blocks of PATTERN_BLOCK tokens, so a block mask of them is block-sparse: full blocks only)."""
    qb, kb = q_idx // PATTERN_BLOCK, kv_idx // PATTERN_BLOCK
    return (qb == kb) | (kb == 0) | ((qb + 2 * kb) % 3 == 0)


MASK_MODS: dict[str, Callable[..., torch.Tensor]] = {
    "prefix_lm": prefix_lm,
    "local_global": local_global,
    "block_pattern": block_pattern,
}
