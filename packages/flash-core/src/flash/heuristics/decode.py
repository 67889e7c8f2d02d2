"""Decisions of the KV-cache pass made once per batch composition: split count and kernel configuration.

Split-KV ("Flash-Decoding"): one decoding step has few query rows, so one program per
(sequence, KV head) leaves most of a GPU idle when the batch is small. The keys of each sequence
are cut into ``num_splits`` parts that run as programs of their own, each writing a partial
output and its LSE, merged exactly afterwards (:func:`flash.merge_states`). The split count is
chosen from the shapes alone (never from the lengths in ``cache_seqlens``, which only the device
knows), so a decode step stays free of host synchronisation and its workspace keeps one size.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from flash.heuristics import UNTABLED, KernelConfig, arch_of, dtype_name, lookup, table_of

if TYPE_CHECKING:
    from flash.backend import Backend
    from flash.kvspec import KVCacheSpec

#: Decoding programs resident per streaming multiprocessor: the Triton decode kernel's 102 KB of
#: shared memory leave room for two on a Hopper SM. Splits fill whole waves of that many programs:
#: on an H200 (2026-12-02, batch 16, GQA 32/8, d128) two splits of the 4k and 32k caches ran 1.10x
#: and 1.11x the five that aiming at four programs per SM gave, pages of 16 1.15x, and batch 1 at
#: 128k 1.06x with 33 splits instead of 66 (PERF_NOTES of flash-triton).
RESIDENT_PER_SM = 2
#: Keys per program tile, and the tiles a program's start costs (its pipeline filling up).
TILE_KEYS = 64
START_TILES = 2
#: Fewest keys a split is worth (below it, writing and merging its partial result costs more than it saves).
MIN_KEYS_PER_SPLIT = 256
#: Most splits the heuristic proposes.
MAX_AUTO_SPLITS = 128


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 1 elsewhere (a CPU gains nothing from splitting)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(batch: int, heads_kv: int, capacity: int, device: torch.device) -> int:
    """Parts to split each sequence's keys into: the count that minimises ``waves x (tiles per split
    + START_TILES)`` for ``batch * heads_kv`` programs per split, :data:`RESIDENT_PER_SM` programs
    per SM at once. A memory-bound program streams at about a fixed rate, so a last wave that is
    partly empty costs nearly a full one: whole waves of long splits beat more, shorter ones. No
    split shorter than :data:`MIN_KEYS_PER_SPLIT` keys of the capacity; ties go to fewer splits
    (fewer partial results to merge); off the GPU, one."""
    slots = RESIDENT_PER_SM * sm_count(device)
    if slots <= 1:
        return 1
    programs = max(1, batch * heads_kv)
    tiles = max(1, -(-capacity // TILE_KEYS))

    def cost(splits: int) -> tuple[int, int]:
        waves = -(-programs * splits // slots)
        return waves * (-(-tiles // splits) + START_TILES), splits

    most = max(1, min(capacity // MIN_KEYS_PER_SPLIT, MAX_AUTO_SPLITS))
    return min(range(1, most + 1), key=cost)


def config_for(backend: Backend, spec: KVCacheSpec) -> KernelConfig:
    """The KV-cache kernel configuration from ``backend``'s table (``pass: "decode"`` rows); a
    backend whose table has no such row gets :data:`flash.heuristics.UNTABLED`."""
    if not any(key.pass_ == "decode" for key in table_of(backend)):
        return UNTABLED
    arch = arch_of(spec.device)
    return lookup(backend, arch, dtype_name(spec.dtype), spec.head_dim, spec.causal, "decode").config
