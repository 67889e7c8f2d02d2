"""Where an eager tiny attention call spends the host's time on a GPU machine: cProfile of many
back-to-back calls of the overhead problem (1 query, 16 keys, 8 heads, d64, bf16), forward and
forward+backward, the top functions by own time; then per-call times of the pieces of the
Hopper kernel's launch; with ``--kernels``, the GPU time of each kernel of the forward+backward
(torch.profiler), to tell a host-bound call from a device-bound one.

    python3 tests/gpu/host_profile.py [--calls 2000] [--top 30] [--kernels]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

import torch

import flash


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--kernels", action="store_true", help="also the GPU time per kernel (torch.profiler)")
    args = parser.parse_args()
    q, k, v = (torch.randn(1, n, 8, 64, device="cuda", dtype=torch.bfloat16) for n in (1, 16, 16))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: dict[str, Callable[[], object]] = {
        "flash fwd": lambda: flash.attention(q, k, v),
        "flash fwd+bwd": lambda: torch.autograd.grad(flash.attention(*leaves), leaves, dout),
        "sdpa fwd": lambda: sdpa(qt, kt, vt),
        "empty x2": lambda: (torch.empty_like(q), torch.empty((1, 8, 1), device="cuda")),
        "current_stream": lambda: torch.cuda.current_stream(q.device).cuda_stream,
        "raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "device ctx": lambda: torch.cuda.device(0).__enter__(),
    }
    print(flash.explain(q, k, v))
    for name, fn in calls.items():
        print(f"{name:16s} {per_call_us(fn, args.calls):8.1f} us/call (wall, host-bound)")
    for name in ("flash fwd", "flash fwd+bwd"):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            calls[name]()
        profile.disable()
        torch.cuda.synchronize()
        print(f"\n==== cProfile: {name}, {args.calls} calls (times are totals)")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    if args.kernels:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                calls["flash fwd+bwd"]()
            torch.cuda.synchronize()
        print("\n==== torch.profiler: flash fwd+bwd, 50 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
