"""Context parallelism: exact attention over a sequence sharded across ranks (ring attention).

``import flash`` does not import this package; ``flash.distributed`` (or ``import
flash.distributed``) does.

>>> from flash.distributed import ring_attention, shard, unshard, positions   # doctest: +SKIP
"""

from flash.distributed.ring import ring_attention, ring_attention_varlen
from flash.distributed.sharding import (
    SHARDINGS,
    Sharding,
    positions,
    positions_varlen,
    shard,
    shard_varlen,
    unshard,
    unshard_varlen,
)

__all__ = [
    "SHARDINGS",
    "Sharding",
    "positions",
    "positions_varlen",
    "ring_attention",
    "ring_attention_varlen",
    "shard",
    "shard_varlen",
    "unshard",
    "unshard_varlen",
]
