"""Forward (or backward) calls for Nsight Compute: each case is run once to compile and warm up, then
once inside a profiler range, so ``ncu --profile-from-start off`` sees exactly one call per case.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python3 tests/gpu/profile_cases.py --backend cuda --cases 128:8192:full,128:1024:full
    ncu ... -k regex:flash_bwd_sm90 python3 tests/gpu/profile_cases.py --backward --cases 128:8192:full
    ncu ... python3 tests/gpu/profile_cases.py --decode 32768,4096   # one decoding step each, then SDPA cuDNN's
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import flash
from flash import timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--cases", default="128:8192:full", help="head_dim:seqlen:full|causal, comma-separated")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--backward", action="store_true", help="profile the backward (the forward runs outside)")
    parser.add_argument("--decode", help="KV lengths: a decoding step (batch 16, GQA 32/8, d128) and cuDNN's")
    args = parser.parse_args()
    if args.decode:
        for length in args.decode.split(","):
            profile_decode(int(length), "auto")  # the cuda backend has no KV-cache pass
        return
    for case in args.cases.split(","):
        head_dim, seqlen, mask = case.split(":")
        batch, heads = timing.convention_shape(seqlen=int(seqlen), head_dim=int(head_dim))
        q, k, v = (
            torch.randn(batch, int(seqlen), heads, int(head_dim), device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        extra: dict[str, torch.Tensor] = {}
        if args.dtype == "fp8":
            (q, extra["q_descale"]), (k, extra["k_descale"]), (v, extra["v_descale"]) = (
                flash.fp8.quantize(t) for t in (q, k, v)
            )
        if args.backward:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        call = lambda: flash.attention(q, k, v, causal=mask == "causal", backend=args.backend, **extra)  # noqa: E731
        if args.backward:
            out = call()
            dout = torch.randn_like(out)
            run = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        else:
            run = call
        profile_once(run)
        print("profiled", case, flush=True)


def profile_decode(length: int, backend: str) -> None:
    """One decoding step of flash (KV cache) and of SDPA's cuDNN kernel on the same cache, profiled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads_q, heads_kv, d = 16, 32, 8, 128
    q = torch.randn(batch, 1, heads_q, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, length, heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def ours() -> torch.Tensor:
        return flash.attention_with_kvcache(q, k, v, cache_seqlens=lengths, backend=backend)

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    for run in (ours, cudnn):
        profile_once(run)
    print("profiled decode", length, flush=True)


def profile_once(run: Callable[[], object]) -> None:
    """``run`` once to compile and warm up, then once inside the profiler range."""
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
