"""The reference implementations: the exact oracle and the tiled pure-torch FlashAttention."""

from flash.reference.oracle import dense_attention
from flash.reference.tiled import TileStep

__all__ = ["TileStep", "dense_attention"]
