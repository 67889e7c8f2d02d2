"""Kernel by kernel, what one decoding step costs on the GPU: flash's KV-cache call against SDPA cuDNN.

The benchmark's decode section times whole steps (kernels plus the gaps between them); this separates
the two with torch.profiler: per step, each kernel's device time, and the span from the first kernel's
start to the last one's end (kernels plus gaps, back-to-back eager calls). Issue 10's case: batch 16,
GQA 32/8, d128, bf16, KV 4k and 32k. Needs a CUDA GPU.

    python packages/flash-triton/scripts/decode_kernel_times.py [--lengths 4096,32768] [--steps 20]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import flash

BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = 16, 32, 8, 128


def steps(length: int) -> dict[str, Callable[[], object]]:
    shape = (BATCH, length, HEADS_KV, HEAD_DIM)
    q = torch.randn(BATCH, 1, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    lengths = torch.full((BATCH,), length, dtype=torch.int32, device="cuda")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def cudnn() -> object:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    return {"flash": lambda: flash.attention_with_kvcache(q, k, v, cache_seqlens=lengths), "sdpa-cudnn": cudnn}


def kernel_times(step: Callable[[], object], count: int) -> tuple[float, dict[str, float]]:
    """(span per step, mean device time of each kernel per call), in microseconds."""
    for _ in range(5):  # compile, plan, warm the caches
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    times: dict[str, list[float]] = {}
    for event in events:
        times.setdefault(event.name, []).append(event.device_time)
    span = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / count
    return span, {name: sum(t) / len(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,32768")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {BATCH}, GQA {HEADS_Q}/{HEADS_KV}, "
          f"d{HEAD_DIM}, bf16; microseconds per step")  # fmt: skip
    for length in map(int, args.lengths.split(",")):
        for name, step in steps(length).items():
            span, kernels = kernel_times(step, args.steps)
            listed = "; ".join(f"{kernel[:40]} {us:.1f}" for kernel, us in kernels.items())
            print(f"KV {length:>6} {name:<10} span {span:7.1f} | {listed}", flush=True)


if __name__ == "__main__":
    main()
