"""Context parallelism: exact attention over a sequence sharded across ranks (ring attention).

``import flash`` does not import this package; ``flash.distributed`` (or ``import
flash.distributed``) does.

>>> from flash.distributed import ring_attention, shard, unshard, positions   # doctest: +SKIP
"""

from flash.distributed.ring import ring_attention
from flash.distributed.sharding import SHARDINGS, Sharding, positions, shard, unshard

__all__ = ["SHARDINGS", "Sharding", "positions", "ring_attention", "shard", "unshard"]
