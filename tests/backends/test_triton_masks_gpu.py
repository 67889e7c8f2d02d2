"""flash-triton's mask options on a GPU (the ``gpu`` tier): compiled as shipped, hidden blocks never read,
the SDPA drop-in's padding mask against PyTorch's.

The conformance suite's GPU cases (``bf16_mask_*``, ``bf16_alibi_*``, ``bf16_score_mod_*``,
``bf16_mask_mod_*``, ``bf16_block_mask_*``) check results at real sizes against the float64 oracle;
these tests check what only a compiled kernel shows.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import flash
from flash.testing import mod_examples

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu
SEQ, HEADS, DIM = 2048, 8, 128


def _qkv(seqlen: int = SEQ, requires_grad: bool = True):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return tuple(
        torch.randn(2, HEADS, seqlen, DIM, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(
            requires_grad
        )
        for _ in range(3)
    )


def _options() -> dict[str, dict]:
    rows = torch.arange(SEQ, device="cuda")
    padding = (rows < torch.tensor([SEQ, SEQ // 3], device="cuda")[:, None])[:, None, None, :]
    local = flash.BlockMask.from_mask_mod(mod_examples.local_global, batch=None, heads=None, seqlen_q=SEQ,
                                          seqlen_k=SEQ, device="cuda")  # fmt: skip
    return {
        "bool": {"attn_mask": torch.rand(2, 1, SEQ, SEQ, device="cuda") > 0.5},
        "padding": {"attn_mask": padding, "causal": True},
        "bias_grad": {"attn_mask": torch.randn(1, HEADS, SEQ, SEQ, device="cuda", requires_grad=True)},
        "alibi": {"alibi_slopes": torch.rand(HEADS, device="cuda"), "causal": True},
        "score_mod": {"score_mod": mod_examples.softcap, "score_mod_grad": mod_examples.softcap_grad},
        "mask_mod": {"mask_mod": mod_examples.prefix_lm},
        "block_mask": {"block_mask": local},
        "block_mask_window": {"block_mask": local, "window": (64, 0)},
    }


OPTIONS = ("bool", "padding", "bias_grad", "alibi", "score_mod", "mask_mod", "block_mask", "block_mask_window")


@pytest.mark.parametrize("name", OPTIONS)
def test_every_mask_option_compiles_as_shipped(name: str) -> None:
    """The table's tiles compile for each option: the fallback ladder (a RuntimeWarning) stays unused."""
    options = _options()[name]
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = flash.attention(q, k, v, layout="bhsd", backend="triton", **options)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    assert all(g.isfinite().all() for g in grads)


def _poison(t: torch.Tensor, keys: slice) -> torch.Tensor:
    t = t.detach().clone()
    t[:, :, keys] = float("nan")
    return t


def test_block_mask_hidden_blocks_are_never_read() -> None:
    q, k, v = _qkv(requires_grad=False)
    mask = flash.BlockMask.from_mask_mod(_first_half, batch=None, heads=None, seqlen_q=SEQ, seqlen_k=SEQ,
                                         device="cuda")  # fmt: skip
    clean = flash.attention(q, k, v, layout="bhsd", block_mask=mask, backend="triton")
    dirty = flash.attention(q, _poison(k, slice(SEQ // 2, SEQ)), _poison(v, slice(SEQ // 2, SEQ)), layout="bhsd",
                            block_mask=mask, backend="triton")  # fmt: skip
    assert torch.equal(clean, dirty)


def _first_half(b, h, q_idx, kv_idx):
    return kv_idx < 1024


def test_sdpa_padding_mask_matches_pytorch() -> None:
    q, k, v = _qkv(requires_grad=False)
    lengths = torch.tensor([SEQ, 700], device="cuda")
    mask = (torch.arange(SEQ, device="cuda") < lengths[:, None])[:, None, None, :]
    got = flash.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
