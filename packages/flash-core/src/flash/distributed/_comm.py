"""Passing tensors one step around a ring.

:class:`ProcessGroupRing` sends to the next rank and receives from the previous one with
asynchronous point-to-point operations on the group's own backend (NCCL for CUDA tensors,
gloo for CPU ones), so the caller computes while the transfer runs and waits only when it needs
the data. :class:`Loopback` stands in for it on one device (benchmarks): it "receives" what it
sends, instantly, so the compute of a ring step can be timed alone.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class Pending(Protocol):
    def wait(self) -> list[Tensor]:
        """Block (CPU) or order the current stream (CUDA) after the transfer; return what arrived."""
        ...


class Ring(Protocol):
    world_size: int
    rank: int

    def exchange(self, tensors: list[Tensor]) -> Pending:
        """Start sending ``tensors`` (contiguous) to the next rank and receiving tensors of the
        same shapes from the previous one. Every rank must make the same sequence of calls."""
        ...


class _Transfer:
    def __init__(self, works: list[dist.Work], sent: list[Tensor], received: list[Tensor]) -> None:
        # Holding the sent tensors keeps them alive until the transfer is waited on.
        self.works, self.sent, self.received = works, sent, received

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.received


class ProcessGroupRing:
    """The ring of the ranks of ``group``, in rank order."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = self._global((self.rank + 1) % self.world_size)
        self.prev = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        """P2P ops name peers by global rank, also within a subgroup."""
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, tensors: list[Tensor]) -> _Transfer:
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for tag, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for tag, t in enumerate(received)]
        return _Transfer(dist.batch_isend_irecv(ops), tensors, received)


class _Arrived:
    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors

    def wait(self) -> list[Tensor]:
        return self.tensors


class Loopback:
    """A one-device stand-in for the ring: rank ``rank`` of ``world_size``, no communication."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank

    def exchange(self, tensors: list[Tensor]) -> _Arrived:
        return _Arrived(tensors)
