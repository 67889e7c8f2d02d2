"""Run a function on every rank of a local process group, for the distributed tests.

A :class:`RankPool` spawns ``world_size`` processes once, joins them into a process group
(gloo on 127.0.0.1 on the CPU, NCCL with one GPU per rank), and then runs any number of tasks:
``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the ranks' results, or
raises with every failing rank's traceback. Starting processes is the slow part, so tests share
pools. ``fn`` must be importable by name (a module-level function).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds a collective may block before gloo/NCCL give up (a failed rank leaves the others waiting).
COLLECTIVE_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, tasks: Any, results: Any) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # no NVLink multicast (see the device notes)
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                results.put((rank, True, fn(*args)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    # Every result was delivered (run() waits for them): skip torch's slow interpreter teardown.
    os._exit(0)


class RankPool:
    """``world_size`` processes in one process group, running tasks on request."""

    def __init__(self, world_size: int, backend: str = "gloo") -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        port = _free_port()
        self.processes = [
            context.Process(
                target=_worker, args=(rank, world_size, port, backend, self.tasks[rank], self.results), daemon=True
            )
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = COLLECTIVE_TIMEOUT + 60) -> list[Any]:
        """``fn(*args)`` on every rank; the results in rank order."""
        if self.broken:
            raise RuntimeError("an earlier task left this pool's ranks out of step")
        for tasks in self.tasks:
            tasks.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self.results.get(timeout=timeout)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            self.broken = True
            raise AssertionError(f"{fn.__name__}: ranks {sorted(outcomes)} of {self.world_size} answered") from None
        failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(outcomes.items()) if not ok]
        if failures:
            # Ranks that failed together (the same error before any communication) stay in step.
            self.broken = len(failures) != self.world_size
            raise AssertionError(f"{fn.__name__} failed\n" + "\n".join(failures))
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for tasks in self.tasks:
            with contextlib.suppress(Exception):
                tasks.put(None)
        deadline = time.monotonic() + 15
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
