"""How flash measures: one timer, one per-call timer, one memory probe and one FLOP convention,
shared by the demo, autotuning, the backends' tuners and the ``flash-bench`` benchmarks.

:func:`measure` is the kernel timer: the median of many timed calls after a warm-up, with CUDA
events on a GPU (the L2 cache flushed before each call, as ``triton.testing.do_bench`` does, so
numbers stay comparable with earlier runs) and ``time.perf_counter`` on the CPU. On a GPU the
device waits before each timed call for as long as the host takes to issue it, so a call whose
host work outlasts its kernels is not timed as an idle GPU waiting for launches.
:func:`per_call_us` is the overhead timer: host wall time per call of many back-to-back calls,
synchronised once at the end, which is what a tiny problem costs a caller.

The FLOP convention is FlashAttention's: a forward pass is ``4 * batch * heads * seqlen_q *
seqlen_k * head_dim`` floating-point operations over the (query, key) pairs a row sees (half of
them for a square causal mask), a backward pass 2.5 times that, forward+backward 3.5 times.
Benchmarks use batch * seqlen = :data:`TOKENS` and heads * head_dim = :data:`MODEL_DIM`.

>>> from flash.timing import attention_flops, convention_shape
>>> convention_shape(seqlen=8192, head_dim=128)
(2, 16)
>>> attention_flops(batch=2, heads=16, seqlen_q=8192, seqlen_k=8192, head_dim=128, causal=True, mode="fwd") / 1e12
0.549755813888
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Literal

import torch

Mode = Literal["fwd", "bwd", "fwd_bwd"]

#: Tokens per batch in the benchmark convention (batch * seqlen).
TOKENS = 16384
#: Model dimension in the benchmark convention (heads * head_dim).
MODEL_DIM = 2048
#: FLOPs of each mode as a multiple of the forward's.
MODE_FACTORS: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
#: Bytes zeroed before each timed GPU call: more than any GPU's L2 cache.
L2_FLUSH_BYTES = 256 * 2**20
#: GPU clock cycles per second used to turn a host time into a device-side wait: above any current
#: GPU's clock, so the wait lasts at least as long as the host time (a longer wait costs nothing timed).
_FASTEST_CLOCK_HZ = 2.5e9
#: The longest device-side wait before one timed call.
_LONGEST_LEAD_S = 0.01
#: Distributions whose versions every result records (besides torch, python and the GPU).
RECORDED_DISTRIBUTIONS = (
    "flash-core",
    "flash-triton",
    "flash-cuda",
    "flash-bench",
    "triton",
    "cupy-cuda13x",
    "cupy-cuda12x",
)


# ----------------------------------------------------------------------------- time


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    warmup_ms: float = 25.0,
    budget_ms: float = 100.0,
    min_repeats: int = 5,
    max_repeats: int = 10_000,
    flush_l2: bool = True,
) -> float:
    """Median milliseconds of one call of ``fn`` on ``device``.

    ``fn`` runs once untimed (compilation and caches stay out of the numbers), then for about
    ``warmup_ms``, then ``budget_ms / (time of one call)`` times, clamped to
    ``[min_repeats, max_repeats]``, each call timed alone. On a GPU each call is timed with CUDA
    events, after zeroing :data:`L2_FLUSH_BYTES` when ``flush_l2`` (cold caches, as real inputs are)
    and behind a device-side wait as long as twice the host time of one call (at most 10 ms), so the
    time is the device's: what the host costs per call is :func:`per_call_us`'s to measure.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if gpu and flush_l2 else None
    fn()
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    estimate = max((time.perf_counter() - start) * 1e3, 1e-6)
    for _ in range(int(warmup_ms / estimate)):
        fn()
    repeats = min(max(int(budget_ms / estimate), min_repeats), max_repeats)
    if not gpu:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    host_s = time.perf_counter()
    fn()  # issued, not waited for: the host's share of one call
    host_s = time.perf_counter() - host_s
    lead_cycles = int(min(2 * host_s, _LONGEST_LEAD_S) * _FASTEST_CLOCK_HZ)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for begin, end in events:
        if flush is not None:
            flush.zero_()
        # The device spins while the host issues the call, so the begin event fires when the call's
        # work is already queued behind it: no host time between the events.
        torch.cuda._sleep(lead_cycles)
        begin.record()
        fn()
        end.record()
    _synchronize(device)
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def per_call_us(fn: Callable[[], object], *, device: torch.device | str, calls: int = 400, warmup: int = 20) -> float:
    """Host wall time per call of ``fn``, in microseconds: ``calls`` back-to-back calls after
    ``warmup`` untimed ones, synchronised once at the end (the device may lag the host until then)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


# ----------------------------------------------------------------------------- memory


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide the profiler's native start/stop log lines (written by C++ straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_mib(fn: Callable[[], object]) -> float:
    # Every CPU allocation and free is a timestamped ``[memory]`` profiler record; their running sum
    # in time order is the live-memory curve, whose maximum is the peak.
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    level = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        level += record.nbytes()
        peak = max(peak, level)
    return peak / 2**20


def peak_mib(fn: Callable[[], object], *, device: torch.device | str) -> float:
    """Peak memory ``fn`` allocates on ``device`` beyond what was allocated before, in MiB
    (from the caching allocator's statistics on a GPU, from the profiler's records on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_mib(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------- the FLOP convention


def convention_shape(
    *, seqlen: int, head_dim: int, tokens: int = TOKENS, model_dim: int = MODEL_DIM
) -> tuple[int, int]:
    """``(batch, heads)`` of the benchmark problem at ``seqlen`` and ``head_dim``."""
    return max(1, tokens // seqlen), max(1, model_dim // head_dim)


def visible_pairs(*, seqlen_q: int, seqlen_k: int, causal: bool) -> float:
    """(query, key) pairs one head computes: all of them, or under a bottom-right causal mask the
    area of the visible region (exactly half of a square; FlashAttention's convention)."""
    if not causal:
        return float(seqlen_q * seqlen_k)
    if seqlen_q <= seqlen_k:
        return seqlen_q * seqlen_k - seqlen_q * seqlen_q / 2
    return seqlen_k * seqlen_k / 2  # the first seqlen_q - seqlen_k rows see no key


def attention_flops(
    *, batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool, mode: Mode
) -> float:
    """Floating-point operations of one attention call by the FlashAttention convention:
    ``4 * batch * heads * pairs * head_dim`` for the forward, times :data:`MODE_FACTORS` ``[mode]``."""
    pairs = visible_pairs(seqlen_q=seqlen_q, seqlen_k=seqlen_k, causal=causal)
    return 4.0 * batch * heads * pairs * head_dim * MODE_FACTORS[mode]


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / ms / 1e9


# ----------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """Date, machine and versions: what every recorded measurement carries."""
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        major, minor = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{major}{minor}"
    for dist in RECORDED_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    return info
