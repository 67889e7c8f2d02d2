"""One way to time a callable, shared by the demo, the benchmark, autotuning and the tuners."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` on ``device``: CUDA events on a GPU, the host clock elsewhere.

    ``warmup`` calls run first, so compilation and caches stay out of the numbers.
    """
    on_gpu = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
