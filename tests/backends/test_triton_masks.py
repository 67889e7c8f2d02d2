"""flash-triton's mask options in Triton's CPU interpreter: what the conformance suite cannot see.

Hidden blocks of a block mask or a boolean mask are never read (NaN planted there never reaches a
result), an additive mask's gradient holds to the tolerance rule, user functions become Triton
functions (closure constants included) or fail named, and a score_mod without a derivative trains
through the reference backward, as ``flash.explain`` says.
"""

from __future__ import annotations

import pytest
import torch

import flash
from flash import mods
from flash.errors import InvalidInputError
from flash.plan import CallMasks
from flash.reference.oracle import dense_attention
from flash.testing import assert_within_rule, mod_examples

pytest.importorskip("triton")

from flash_triton import runtime

pytestmark = pytest.mark.skipif(
    not runtime.interpreting() or runtime.mode_mismatch() is not None,
    reason="CPU tier: needs TRITON_INTERPRET=1 set before Python starts (as nox sets it without a GPU)",
)


def _qkv(seqlen: int = 64, heads: int = 2, dtype=torch.float16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, seqlen, heads, 32, generator=gen).to(dtype) for _ in range(3))


def _poison(t: torch.Tensor, keys: slice) -> torch.Tensor:
    t = t.clone()
    t[:, keys] = float("nan")
    return t


def _first_32(b, h, q_idx, kv_idx):
    return kv_idx < 32


def test_hidden_blocks_are_never_read() -> None:
    """Keys 32..63 are hidden from every query: NaN there must reach no output, no dQ, no dK/dV of other keys."""
    q, k, v = _qkv()
    block_mask = flash.BlockMask.from_mask_mod(_first_32, batch=None, heads=None, seqlen_q=64, seqlen_k=64,
                                               block_size=(32, 32))  # fmt: skip
    dense = (torch.arange(64) < 32)[None, None, None, :]  # a padding mask: the same keys, from a tensor
    for options in ({"block_mask": block_mask}, {"attn_mask": dense}):
        clean = flash.attention(q, k, v, backend="triton", **options)
        k2, v2 = (_poison(t, slice(32, 64)).requires_grad_() for t in (k, v))
        q2 = q.clone().requires_grad_()
        dirty = flash.attention(q2, k2, v2, backend="triton", **options)
        assert torch.equal(dirty, clean), options
        dq, dk, _ = torch.autograd.grad(dirty.float().sum(), (q2, k2, v2))
        assert not dq.isnan().any() and not dk[:, :32].isnan().any()


def test_additive_mask_gradient_holds_to_the_rule() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(seqlen=40, dtype=torch.bfloat16))
    bias = torch.randn(1, 2, 40, 40, requires_grad=True)
    dout = torch.randn(q.shape).to(q.dtype)
    got = torch.autograd.grad(flash.attention(q, k, v, attn_mask=bias, causal=True, backend="triton"), bias, dout)[0]
    spec = flash.build_spec(q, k, v, attn_mask=bias, causal=True)

    def grad(dtype):
        ins = [t.detach().to(dtype if dtype == torch.float64 else t.dtype).requires_grad_() for t in (q, k, v, bias)]
        out, _ = dense_attention(spec, *ins[:3], masks=CallMasks(attn_mask=ins[3]).tensors(), compute_dtype=dtype)
        return torch.autograd.grad(out, ins[3], dout.to(dtype))[0]

    assert_within_rule("dbias", got, grad(torch.float64), grad(torch.bfloat16), torch.bfloat16)


def _make_window_mod(width: int):
    def window(b, h, q_idx, kv_idx):
        return mods.abs(q_idx - kv_idx) <= width

    return window


def test_closure_constants_reach_the_kernel() -> None:
    q, k, v = _qkv(seqlen=40)
    for width in (3, 11):  # a new function per width: a new kernel specialisation each
        mod = _make_window_mod(width)
        got = flash.attention(q, k, v, mask_mod=mod, backend="triton")
        want = flash.attention(q, k, v, window=(width, width), backend="triton")
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def _torch_only(score, b, h, q_idx, kv_idx):
    return torch.sin(score)  # fine on torch tensors, not a Triton function


def test_a_score_mod_triton_cannot_run_is_named() -> None:
    q, k, v = _qkv(seqlen=16)
    with pytest.raises(InvalidInputError) as caught:
        flash.attention(q, k, v, score_mod=_torch_only, backend="triton")
    assert caught.value.argument == "score_mod"


def test_score_mod_without_derivative_trains_on_the_reference_backward() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(seqlen=24))
    explained = str(flash.explain(q, k, v, score_mod=mod_examples.softcap))
    assert "score_mod without score_mod_grad" in explained
    assert "backward: reference" in explained
    out = flash.attention(q, k, v, score_mod=mod_examples.softcap, backend="triton")
    got = torch.autograd.grad(out.float().sum(), q)[0]
    with_grad = flash.attention(q, k, v, score_mod=mod_examples.softcap, score_mod_grad=mod_examples.softcap_grad,
                                backend="triton")  # fmt: skip
    want = torch.autograd.grad(with_grad.float().sum(), q)[0]
    torch.testing.assert_close(got, want, atol=4e-3, rtol=0)


@pytest.mark.parametrize("capability", [None, (8, 0)])
def test_a_nan_value_reaches_only_the_rows_that_see_it(monkeypatch: pytest.MonkeyPatch, capability) -> None:
    """A NaN value in a partial (masked) tile reaches exactly the rows that see its key, as in the
    reference: with the per-tile check (Hopper, the interpreter) that tile leaves the fast path and the
    all-finite tiles stay on it; on sm_80 every masked tile takes the guarded product."""
    from flash_triton import mask_args

    monkeypatch.setattr(mask_args, "device_capability", lambda device: capability)
    assert mask_args.tile_guard(flash.build_spec(*_qkv(seqlen=8))) == (1 if capability is None else 2)
    q, k, v = _qkv(seqlen=40)
    v = v.clone()
    v[0, 5, 0, 3] = float("nan")
    v[0, 20, 1, 4] = float("nan")
    got = flash.attention(q, k, v, causal=True, backend="triton")
    want = flash.attention(q, k, v, causal=True, backend="reference")
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 35 + 20
    finite = ~got.isnan()
    torch.testing.assert_close(got[finite], want[finite], atol=2e-3, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_document_runs_match_the_dense_mask(causal: bool) -> None:
    """Documents that are runs of tokens take the kernels' one-interval test (``MASK == 5``); a sequence
    of 45 (tiles past its end) and two sequences with their own documents: forward and every gradient
    as with the same mask read from a dense tensor."""
    ids = torch.tensor([[0] * 7 + [1] * 20 + [2] * 18, [4] * 30 + [9] * 15])
    runs_mask = flash.BlockMask.from_document_ids(ids, causal=causal, block_size=(16, 32))
    assert runs_mask.key_intervals is not None
    rows, cols = torch.arange(45)[:, None], torch.arange(45)[None, :]
    dense = (ids[:, None, :, None] == ids[:, None, None, :]) & ((cols <= rows) | (not causal))
    gen = torch.Generator().manual_seed(3)
    ins = [torch.randn(2, 45, 2, 32, generator=gen).to(torch.float16) for _ in range(3)]
    dout = torch.randn(2, 45, 2, 32, generator=gen).to(torch.float16)
    results = []
    for mask in (runs_mask, flash.BlockMask.from_dense(dense, block_size=(16, 32))):
        q, k, v = (t.clone().requires_grad_() for t in ins)
        out = flash.attention(q, k, v, block_mask=mask, backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
