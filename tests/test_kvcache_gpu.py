"""The KV-cache call on a GPU (the ``gpu`` tier): conformance at real sizes, a decoding step captured
in a CUDA graph and replayed with new inputs, and the documented clamps with guarded caches.

The reference backend is checked on the CPU tier (pure torch: the same code on any device); here
every kernel backend that declares a KV-cache pass meets the float64 oracle at real sizes: 32k
and 128k keys, GQA 32/8, pages of 7 to 256 keys, fp8 caches, rotary, sinks, windows.
"""

from __future__ import annotations

import pytest
import torch

import flash
from flash.testing.kvcache import KVCase, check_kvcache, kv_declared_reasons, kv_gpu_cases
from tests.conftest import require_usable, seed_for
from tests.test_kvcache import CLAMPED, check_clamped

pytestmark = pytest.mark.gpu

GPU_PARAMS = [
    pytest.param(case, id=case.name, marks=pytest.mark.xdist_group(f"kv-{case.name}")) for case in kv_gpu_cases()
]


@pytest.mark.parametrize("case", GPU_PARAMS)
def test_conformance_gpu(backend: str, case: KVCase) -> None:
    require_usable(backend)
    if backend == "reference":
        pytest.skip("the reference backend is checked on the CPU tier (pure torch: the same code on any device)")
    reasons = kv_declared_reasons(backend, case, "cuda")
    if reasons:
        pytest.skip(f"{backend} declares: {'; '.join(reasons)}")
    check_kvcache(backend, case, "cuda", seed_for(case.name))
    torch.cuda.synchronize()


#: Page sizes against the triton kernel's 64-key tiles at real sizes: several pages per tile, a tile
#: per page, several tiles per page (per-page path), and one that is not a power of two (per key).
GPU_PAGES = [
    pytest.param(page, id=f"pages_{page}", marks=pytest.mark.xdist_group(f"kv-pages-{page}"))
    for page in (1, 16, 64, 256, 48)
]


@pytest.mark.parametrize("page_size", GPU_PAGES)
def test_page_sizes_gpu(backend: str, page_size: int) -> None:
    if backend == "reference":
        pytest.skip("the reference backend is checked on the CPU tier")
    case = KVCase("pages", lengths=(4095, 17, 5000, 0), capacity=5120, heads_q=32, heads_kv=8, head_dim=128,
                  dtype=torch.bfloat16, seqlen_q=2, seqlen_new=2, causal=True, window=(3000, 0), sink_tokens=5,
                  page_size=page_size)  # fmt: skip
    require_usable(backend)
    reasons = kv_declared_reasons(backend, case, "cuda")
    if reasons:
        pytest.skip(f"{backend} declares: {'; '.join(reasons)}")
    check_kvcache(backend, case, "cuda", seed_for(f"pages-{page_size}"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("case, argument, bad", CLAMPED, ids=[case.name for case, _, _ in CLAMPED])
def test_unchecked_values_are_clamped_on_the_gpu(backend: str, case: KVCase, argument: str, bad) -> None:
    if backend == "reference":
        pytest.skip("the reference backend is checked on the CPU tier")
    check_clamped(backend, case, argument, bad, "cuda", seed_for(case.name))
    torch.cuda.synchronize()


def _step_inputs(paged: bool, gen: torch.Generator) -> dict:
    batch, hq, hkv, d, capacity, page = 8, 32, 8, 128, 4096, 16
    dev, bf16 = "cuda", torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=dev).to(bf16)

    lengths = torch.tensor([4000, 0, 17, 1024, 2047, 3, 999, 3000], dtype=torch.int32, device=dev)
    args: dict = dict(q=randn(batch, 1, hq, d), k=randn(batch, 1, hkv, d), v=randn(batch, 1, hkv, d))
    if paged:
        pool = batch * capacity // page
        args["k_cache"], args["v_cache"] = randn(pool, page, hkv, d), randn(pool, page, hkv, d)
        order = torch.randperm(pool, generator=gen, device=dev).to(torch.int32)
        args["block_table"] = order.view(batch, capacity // page)
    else:
        args["k_cache"], args["v_cache"] = randn(batch, capacity, hkv, d), randn(batch, capacity, hkv, d)
    angles = torch.arange(capacity, device=dev)[:, None] * 10000.0 ** (-torch.arange(64, device=dev) / 64)
    args.update(cache_seqlens=lengths, rotary_cos=angles.cos(), rotary_sin=angles.sin())
    return args


def _step(args: dict, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One decoding step: append one token per sequence, attend, advance the lengths (on the device)."""
    options = {name: args[name] for name in ("block_table", "rotary_cos", "rotary_sin") if name in args}
    out = flash.attention_with_kvcache(
        args["q"], k_cache, v_cache, args["k"], args["v"], cache_seqlens=lengths, causal=True, **options
    )
    lengths.add_(1)
    return out


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_decoding_step_replays_as_a_cuda_graph(paged: bool) -> None:
    """Capture one step (rotary append, split-KV attention, the combine, the length update), then
    replay it on new tokens: each replay matches an eager step on a copy of the caches bit for bit,
    caches included. Capture fails outright if the step synchronises with the host."""
    require_usable("triton")
    gen = torch.Generator(device="cuda").manual_seed(11)
    args = _step_inputs(paged, gen)
    lengths = args["cache_seqlens"]
    eager = (args["k_cache"].clone(), args["v_cache"].clone(), lengths.clone())
    warm = (args["k_cache"].clone(), args["v_cache"].clone(), lengths.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and plan outside the capture, on throwaway caches
        for _ in range(2):
            _step(args, *warm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(args, args["k_cache"], args["v_cache"], lengths)
    for _ in range(5):
        for name in ("q", "k", "v"):
            args[name].copy_(torch.randn(args[name].shape, generator=gen, device="cuda"))
        graph.replay()
        want = _step(args, *eager)
        torch.cuda.synchronize()
        assert torch.equal(static_out, want)
    assert torch.equal(lengths, eager[2])
    assert torch.equal(args["k_cache"], eager[0]) and torch.equal(args["v_cache"], eager[1])
    spec = flash.explain_kvcache(args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"],
                                 cache_seqlens=lengths, block_table=args.get("block_table")).spec  # fmt: skip
    assert spec.num_splits > 1  # the split path and its combine were in the graph
