"""Hopper forward (flash_cuda.hopper), GPU tier: key-padding masks and block masks with key intervals
(mask kind 3), block-sparse masks of full blocks only (mask kind 4: the tiles walk the block lists)
against the float64 oracle, outputs poisoned with NaN so that a row never written fails.

Skipped without an sm_90 GPU or without CuPy. The conformance suite runs its own mask cases on cuda
too ("padding", "padding_left", "padding_holes", "documents", block masks from mask_mods); these add
what it leaves to chance: an empty sequence next to one with holes, and odd sizes near 8k with GQA.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("flash_cuda.hopper")

import flash
from flash.testing import assert_within_rule, poisoned_outputs
from flash_cuda import backend as cuda_backend
from tests.backends.hopper_harness import require_hopper

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _hopper_gpu():
    require_hopper("the Hopper kernel")


def _dense(q, k, v, seen, dtype):
    """(out, lse) of (b, s, h, d) inputs where ``seen`` (b|1, 1, sq, sk) says which keys each query sees,
    computed in ``dtype``; rows that see nothing: out 0, LSE -inf."""
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    scores = (qt @ kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return (p @ vt).transpose(1, 2), lse


def _check(name, q, k, v, seen, **options):
    """The cuda backend's forward (the Hopper kernel, as explain says) within the rule of the oracle.
    ``seen``: (b|1, h|1, sq, sk)."""
    spec = flash.build_spec(q, k, v, **options)
    assert cuda_backend.CudaBackend().uses_hopper(spec), name
    assert flash.explain(q, k, v, backend="cuda", **options).forward.chosen == "cuda", name
    with poisoned_outputs():
        out, lse = flash.attention(q, k, v, backend="cuda", return_lse=True, **options)
    oracle = _dense(q, k, v, seen, torch.float64)
    naive = _dense(q, k, v, seen, q.dtype)
    assert_within_rule(f"{name} out", out, oracle[0], naive[0], q.dtype)
    assert_within_rule(f"{name} lse", lse, oracle[1], naive[1], q.dtype)


def _inputs(b, sq, sk, hq, hkv, d, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(b, sk, hkv, d, device="cuda", generator=gen).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_empty_sequence_holes_and_runs(d, causal):
    """One sequence sees no key (output 0, LSE -inf), one has holes (every block masked, its mask's
    bytes read), one is right-padded, one left-padded: each row's keys exactly."""
    b, sq, sk = 4, 333, 517
    q, k, v = _inputs(b, sq, sk, 4, 2, d, seed=d)
    keys = torch.arange(sk, device="cuda")
    mask = torch.stack(
        (keys < 0, (keys % 3 != 1) & (keys < 400), keys < 200, keys >= 150)  # empty, holes, right, left
    )[:, None, None, :]
    seen = mask.expand(b, 1, sq, sk)
    if causal:
        seen = seen & torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq)
    _check(f"padding d{d}", q, k, v, seen, attn_mask=mask, causal=causal)


def test_key_padding_with_a_window_and_a_broadcast_mask():
    q, k, v = _inputs(3, 300, 300, 2, 2, 128, dtype=torch.float16, seed=1)
    mask = (torch.arange(300, device="cuda") % 5 != 0)[None, None, None, :]  # holes, one row for the batch
    idx = torch.arange(300, device="cuda")
    band = (idx[None, :] >= idx[:, None] - 40) & (idx[None, :] <= idx[:, None] + 7)
    _check("padding window", q, k, v, mask & band, attn_mask=mask, window=(40, 7))


def _prefix_lm(prefix):
    return lambda b, h, i, j: (j <= i) | (j < prefix)


@pytest.mark.parametrize(("d", "sq", "hq", "hkv"), [(128, 8191, 4, 1), (64, 8179, 6, 2), (128, 1000, 2, 2)])
def test_prefix_lm_block_mask_at_odd_sizes(d, sq, hq, hkv):
    """A prefix-LM block mask (key intervals: [0, max(i + 1, prefix))) near 8k, d128 and d64, GQA."""
    q, k, v = _inputs(1, sq, sq, hq, hkv, d, seed=sq)
    prefix = sq // 3 + 5
    block = flash.BlockMask.from_mask_mod(_prefix_lm(prefix), batch=None, heads=None, seqlen_q=sq, seqlen_k=sq,
                                          device="cuda")  # fmt: skip
    assert block.key_intervals is not None
    idx = torch.arange(sq, device="cuda")
    seen = ((idx[None, :] <= idx[:, None]) | (idx[None, :] < prefix))[None, None]
    _check(f"prefix-LM d{d} {sq}", q, k, v, seen, block_mask=block)


def test_document_block_mask_with_gqa():
    sq = 2047
    q, k, v = _inputs(2, sq, sq, 8, 2, 128, seed=3)
    ids = (torch.rand(2, sq, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)) < 0.002).cumsum(1)
    block = flash.BlockMask.from_document_ids(ids)
    assert block.key_intervals is not None
    idx = torch.arange(sq, device="cuda")
    seen = (ids[:, :, None] == ids[:, None, :]) & (idx[None, :] <= idx[:, None])
    _check("documents", q, k, v, seen[:, None], block_mask=block)


def _random_blocks(b, h, sq, sk, density, seed):
    """bool (b|1, h|1, sq, sk): random 128x128 blocks at about ``density`` plus the diagonal (the benchmark's
    pattern), cut to the sizes: tail blocks partial only past the ends, so the mask is block-sparse."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nq, nk = -(-sq // 128), -(-sk // 128)
    blocks = torch.rand(b, h, nq, nk, device="cuda", generator=gen) < density
    blocks |= torch.eye(nq, nk, dtype=torch.bool, device="cuda")
    return blocks.repeat_interleave(128, 2).repeat_interleave(128, 3)[..., :sq, :sk].contiguous()


@pytest.mark.parametrize(
    ("d", "b", "sq", "sk", "hq", "hkv", "mb", "mh"),
    [
        (128, 2, 1000, 1100, 8, 2, 1, 1),  # tail blocks on both axes, GQA, one mask for all
        (64, 2, 777, 1500, 4, 4, 2, 4),  # one mask per sequence and head
        (128, 1, 8192, 8192, 4, 4, 1, 4),  # the benchmark's size, ~10% density
        (192, 2, 513, 700, 2, 1, 2, 1),  # 64-key kernel blocks: two per mask block
        (256, 1, 300, 129, 2, 2, 1, 1),
    ],
)
def test_block_sparse_masks_walk_the_block_lists(d, b, sq, sk, hq, hkv, mb, mh):
    """Random full blocks plus the diagonal (rows of a tile whose list is empty: output 0, LSE -inf where a
    row sees nothing), through the block lists of the Hopper forward (explain: cuda, mask kind 4)."""
    seen = _random_blocks(mb, mh, sq, sk, 0.1 if sq > 4096 else 0.3, seed=sq + d)
    seen[..., :128, :] &= torch.arange(sk, device="cuda") >= 128 * (sk > 256)  # a block row without the diagonal
    block = flash.BlockMask.from_dense(seen, block_size=(128, 128))
    assert block.info.feature == "block_sparse"
    q, k, v = _inputs(b, sq, sk, hq, hkv, d, seed=sk)
    spec = flash.build_spec(q, k, v, block_mask=block)
    assert "block_sparse" in spec.features()
    _check(f"block-sparse d{d} {sq}x{sk}", q, k, v, seen, block_mask=block)
