"""The public API beyond flash.attention: the SDPA drop-in, packed QKV, the MHA module, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import flash
from flash import InvalidInputError


def bhsd(b=2, h=3, s=11, d=16, dtype=torch.float64):
    return torch.randn(b, h, s, d, dtype=dtype)


class TestSdpaDropIn:
    @pytest.mark.parametrize("q_len, k_len", [(11, 11), (13, 7), (5, 9)])
    @pytest.mark.parametrize("is_causal", [False, True])
    def test_matches_torch(self, q_len, k_len, is_causal):
        q, k, v = bhsd(s=q_len), bhsd(s=k_len), bhsd(s=k_len)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        got = flash.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        torch.testing.assert_close(got, want)

    def test_top_left_causal_with_more_queries_runs_through_flash(self, monkeypatch):
        calls = []
        monkeypatch.setattr(flash.api, "attention", lambda *a, **kw: calls.append(kw) or torch.zeros(2, 3, 13, 16))
        flash.scaled_dot_product_attention(bhsd(s=13), bhsd(s=7), bhsd(s=7), is_causal=True)
        assert calls and calls[0]["window"] == (-1, 6) and calls[0]["causal"] is False

    @pytest.mark.parametrize("kind", ["bool", "float"])
    def test_masks(self, kind):
        q, k, v = bhsd(), bhsd(s=7), bhsd(s=7)
        mask = torch.rand(2, 1, 11, 7) > 0.3
        if kind == "float":
            mask = torch.randn(2, 1, 11, 7, dtype=torch.float64)
        torch.testing.assert_close(
            flash.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        )

    def test_gqa_scale_and_shapes(self):
        q, k, v = bhsd(h=6), bhsd(h=2), bhsd(h=2)
        want = F.scaled_dot_product_attention(q, k, v, scale=0.7, enable_gqa=True)
        torch.testing.assert_close(flash.scaled_dot_product_attention(q, k, v, scale=0.7, enable_gqa=True), want)
        with pytest.raises(InvalidInputError, match="enable_gqa"):
            flash.scaled_dot_product_attention(q, k, v)
        q3 = torch.randn(4, 10, 8, dtype=torch.float64)  # (batch, seqlen, dim)
        torch.testing.assert_close(
            flash.scaled_dot_product_attention(q3, q3, q3), F.scaled_dot_product_attention(q3, q3, q3)
        )
        q5 = torch.randn(2, 2, 3, 10, 8, dtype=torch.float64)  # extra leading dims
        torch.testing.assert_close(
            flash.scaled_dot_product_attention(q5, q5, q5, is_causal=True),
            F.scaled_dot_product_attention(q5, q5, q5, is_causal=True),
        )

    def test_dropout_keeps_expectation(self):
        torch.manual_seed(0)
        q = k = bhsd(b=1, h=1, s=64, d=8)
        v = torch.ones(1, 1, 64, 8, dtype=torch.float64)
        out = flash.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
        assert not torch.allclose(out, torch.ones_like(out))  # something was dropped
        assert out.mean().item() == pytest.approx(1.0, abs=0.1)  # kept weights are rescaled by 1 / (1 - p)


def test_qkvpacked_is_attention_of_its_slices_and_gets_gradients():
    qkv = torch.randn(2, 9, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    out = flash.attention_qkvpacked(qkv, causal=True)
    torch.testing.assert_close(out, flash.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True))
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    with pytest.raises(InvalidInputError, match="qkv"):
        flash.attention_qkvpacked(torch.randn(2, 9, 4, 16))


def test_qkvpacked_varlen():
    qkv = torch.randn(12, 3, 2, 8, dtype=torch.float64)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = flash.attention_qkvpacked(qkv, cu_seqlens=cu)
    first = flash.attention(*(qkv[:5, i][None] for i in range(3)))[0]
    torch.testing.assert_close(out[:5], first)


class TestMultiheadAttention:
    @pytest.mark.parametrize("batch_first", [False, True])
    def test_loads_torch_state_dict_and_matches(self, batch_first):
        torch.manual_seed(0)
        ref = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, dtype=torch.float64)
        ours = flash.nn.MultiheadAttention(32, 4, batch_first=batch_first, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(3, 5, 32, dtype=torch.float64) if batch_first else torch.randn(5, 3, 32, dtype=torch.float64)
        y = torch.randn(3, 7, 32, dtype=torch.float64) if batch_first else torch.randn(7, 3, 32, dtype=torch.float64)
        want, _ = ref(x, y, y, need_weights=False)
        got, weights = ours(x, y, y)
        assert weights is None
        torch.testing.assert_close(got, want)

    def test_masks_and_kdim_vdim(self):
        torch.manual_seed(1)
        ref = torch.nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True, dtype=torch.float64)
        ours = flash.nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        q, k, v = (torch.randn(3, n, d, dtype=torch.float64) for n, d in ((6, 16), (8, 12), (8, 10)))
        padding = torch.zeros(3, 8, dtype=torch.float64)
        padding[:, -2:] = float("-inf")
        attn = torch.randn(6, 8, dtype=torch.float64)
        want, _ = ref(q, k, v, key_padding_mask=padding, attn_mask=attn, need_weights=False)
        got, _ = ours(q, k, v, key_padding_mask=padding, attn_mask=attn)
        torch.testing.assert_close(got, want)

    def test_causal_self_attention_and_unbatched(self):
        torch.manual_seed(2)
        ref = torch.nn.MultiheadAttention(16, 4, dtype=torch.float64)
        ours = flash.nn.MultiheadAttention(16, 4, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(9, 16, dtype=torch.float64)  # unbatched (seqlen, embed)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
        want, _ = ref(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
        got, _ = ours(x, x, x, is_causal=True)
        torch.testing.assert_close(got, want)

    def test_refuses_what_it_cannot_do(self):
        with pytest.raises(InvalidInputError, match="need_weights"):
            x = torch.randn(3, 2, 8)
            flash.nn.MultiheadAttention(8, 2)(x, x, x, need_weights=True)
        with pytest.raises(InvalidInputError, match="add_bias_kv"):
            flash.nn.MultiheadAttention(8, 2, add_bias_kv=True)
        with pytest.raises(InvalidInputError, match="embed_dim"):
            flash.nn.MultiheadAttention(10, 4)


class TestTorchCompile:
    def test_fullgraph_forward_and_backward(self):
        def loss(q, k, v):
            return flash.attention(q, k, v, causal=True, softcap=3.0).square().sum()

        q, k, v = (torch.randn(2, 33, 4, 16, requires_grad=True) for _ in range(3))
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = compiled(q, k, v)
        got.backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        want = loss(q, k, v)
        want.backward()
        torch.testing.assert_close(got, want)
        for g, t in zip(grads, (q, k, v)):
            torch.testing.assert_close(g, t.grad)

    def test_fullgraph_inductor_varlen_with_lse(self):
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)

        def f(q, k, v):
            out, lse = flash.attention(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7, return_lse=True
            )
            return out * 2, lse

        q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
        out, lse = torch.compile(f, fullgraph=True)(q, k, v)
        want_out, want_lse = f(q, k, v)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(lse, want_lse)
        assert lse.shape == (2, 10)


def test_lse_is_returned_and_not_differentiable():
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _, lse = flash.attention(q, k, v, return_lse=True)
    assert lse.dtype == torch.float64 and lse.shape == (1, 2, 6) and not lse.requires_grad
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    torch.testing.assert_close(lse, s.logsumexp(-1))


def test_empty_sequences():
    q, k = torch.randn(2, 0, 3, 8), torch.randn(2, 5, 3, 8)
    out, lse = flash.attention(q, k, k, return_lse=True)
    assert out.shape == (2, 0, 3, 8) and lse.shape == (2, 3, 0)
    q, k = torch.randn(2, 4, 3, 8, requires_grad=True), torch.randn(2, 0, 3, 8, requires_grad=True)
    out, lse = flash.attention(q, k, k, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
