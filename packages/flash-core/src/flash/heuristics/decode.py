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

#: Programs per streaming multiprocessor the splits aim for: a few resident programs per SM keep
#: enough loads in flight to cover the memory latency, and several waves even out the tail.
PROGRAMS_PER_SM = 4
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
    """Parts to split each sequence's keys into so that ``batch * heads_kv * splits`` programs fill
    the device, without splits shorter than :data:`MIN_KEYS_PER_SPLIT` keys of the capacity."""
    programs = max(1, batch * heads_kv)
    target = PROGRAMS_PER_SM * sm_count(device)
    by_fill = -(-target // programs)
    by_length = max(1, capacity // MIN_KEYS_PER_SPLIT)
    return max(1, min(by_fill, by_length, MAX_AUTO_SPLITS))


def config_for(backend: Backend, spec: KVCacheSpec) -> KernelConfig:
    """The KV-cache kernel configuration from ``backend``'s table (``pass: "decode"`` rows); a
    backend whose table has no such row gets :data:`flash.heuristics.UNTABLED`."""
    if not any(key.pass_ == "decode" for key in table_of(backend)):
        return UNTABLED
    arch = arch_of(spec.device)
    return lookup(backend, arch, dtype_name(spec.dtype), spec.head_dim, spec.causal, "decode").config
