"""flash.compat.flash_attn: flash-attn 2.x's functions, signatures and conventions.

The expected values come from a naive float64 implementation of flash-attn's *documented*
semantics, written here independently of flash's spec (bottom-right aligned causal mask and window,
``causal`` forcing the window's right side to 0, query head ``h`` using K/V head ``h // group``),
and low-precision results are held to the suite's tolerance rule.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import flash
import flash.compat.flash_attn as fa
from flash import InvalidInputError
from flash.dropout import random_seed
from flash.testing import assert_within_rule


def documented_mask(q_len: int, k_len: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """flash-attn's docstring: query i sees keys in [i + k_len - q_len - left, i + k_len - q_len + right]."""
    left, right = window
    right = 0 if causal else right
    i = torch.arange(q_len)[:, None] + k_len - q_len
    j = torch.arange(k_len)[None, :]
    seen = torch.ones(q_len, k_len, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


def naive(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None, alibi=None, dtype=torch.float64):
    """Dense attention of (batch, seqlen, heads, dim) tensors in ``dtype``; (out, lse). ``alibi``: slopes
    (heads,), flash-attn's bias ``-slope * |i + k_len - q_len - j|``."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        q_len, k_len = q.shape[1], k.shape[1]
        distance = (torch.arange(q_len)[:, None] + k_len - q_len - torch.arange(k_len)[None, :]).abs()
        s = s - alibi.to(dtype)[:, None, None] * distance.to(dtype)
    s = s.masked_fill(~documented_mask(q.shape[1], k.shape[1], causal, window).to(s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: output 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def rand(*shape, dtype=torch.float64, g=None):
    return torch.randn(*shape, dtype=dtype, generator=g)


# flash-attn 2.x flash_attn_interface.py: parameter names in order, and their defaults.
COMMON = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
REQUIRED = object()
SIGNATURES = {
    "flash_attn_func": ["q", "k", "v"],
    "flash_attn_qkvpacked_func": ["qkv"],
    "flash_attn_kvpacked_func": ["q", "kv"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_flash_attn(name):
    want = [(p, REQUIRED) for p in SIGNATURES[name]] + COMMON
    if name == "flash_attn_varlen_func":
        want.append(("block_table", None))
    params = inspect.signature(getattr(fa, name)).parameters.values()
    got = [(p.name, REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == want
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_documented_causal_examples():
    """The two causal masks drawn in flash-attn's docstring."""
    assert documented_mask(2, 5, True, (-1, -1)).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert documented_mask(5, 2, True, (-1, -1)).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


@pytest.mark.parametrize(("q_len", "k_len"), [(7, 7), (2, 9), (9, 2)])
@pytest.mark.parametrize(
    ("causal", "window"), [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)), (True, (3, 2)), (False, (-1, 0))]
)
def test_func_matches_documented_semantics(seed, q_len, k_len, causal, window):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(2, q_len, 6, 16, g=g), rand(2, k_len, 2, 16, g=g), rand(2, k_len, 2, 16, g=g)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    want, want_lse = naive(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert s_dmask.numel() == 0  # flash-attn returns an empty S_dmask without dropout


def test_softcap_scale_positional_arguments_and_list_window(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(1, 10, 4, 8, g=g) * 3 for _ in range(3))
    # positional, in flash-attn's order: dropout_p, softmax_scale, causal, window_size, softcap
    out = fa.flash_attn_func(q, k, v, 0.0, 0.3, True, [4, 0], 2.0)
    torch.testing.assert_close(out, naive(q, k, v, causal=True, window=(4, 0), softcap=2.0, scale=0.3)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tolerance_rule_in_low_precision(seed, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(2, 33, 4, 32, g=g).to(device=device, dtype=dtype) for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))
    oracle = naive(q, k, v, causal=True, window=(8, 0))[0]
    low = naive(q, k, v, causal=True, window=(8, 0), dtype=dtype)[0]
    assert_within_rule("flash_attn_func", out, oracle, low, dtype)


def test_varlen_is_each_sequence_alone(seed):
    g = torch.Generator().manual_seed(seed)
    lens_q, lens_k = [3, 6, 1], [5, 6, 4]
    cu_q = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11, 15], dtype=torch.int32)
    q, k, v = rand(10, 4, 16, g=g), rand(15, 2, 16, g=g), rand(15, 2, 16, g=g)
    out, lse, _ = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, window_size=(2, -1), return_attn_probs=True
    )
    assert lse.shape == (4, 10)  # (heads, total_q), as flash-attn
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = naive(q[None, qs], k[None, ks], v[None, ks], causal=True, window=(2, -1))
        torch.testing.assert_close(out[qs], want[0])
        torch.testing.assert_close(lse[:, qs], want_lse[0])


def test_packed_variants_equal_the_unpacked_call_and_get_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    qkv = rand(2, 9, 3, 4, 16, g=g).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    want = fa.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))

    q2, kv = rand(2, 5, 4, 16, g=g), rand(2, 9, 2, 2, 16, g=g)
    torch.testing.assert_close(
        fa.flash_attn_kvpacked_func(q2, kv, causal=True), naive(q2, kv[:, :, 0], kv[:, :, 1], causal=True)[0]
    )


def test_varlen_packed_variants(seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    qkv = rand(11, 3, 2, 8, g=g)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True)
    q, k, v = qkv.unbind(1)
    torch.testing.assert_close(out, fa.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True))
    kv = rand(11, 2, 1, 8, g=g)
    got = fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, softmax_scale=0.5)
    for b in range(2):
        rows = slice(cu[b], cu[b + 1])
        want = naive(q[None, rows], kv[None, rows, 0], kv[None, rows, 1], scale=0.5)[0]
        torch.testing.assert_close(got[rows], want[0])


def test_dropout_draws_its_seed_from_torch(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(1, 16, 2, 8, g=g) for _ in range(3))
    torch.manual_seed(seed)
    first = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(seed)
    again = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(seed)
    explicit = flash.attention(q, k, v, dropout_p=0.3, dropout_seed=random_seed())
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, explicit, rtol=0, atol=0)
    assert not torch.allclose(first, fa.flash_attn_func(q, k, v, dropout_p=0.3))  # a fresh seed, another mask


def test_deterministic_is_accepted(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(1, 8, 2, 8, g=g) for _ in range(3))
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, deterministic=True), naive(q, k, v)[0])


@pytest.mark.parametrize(("q_len", "k_len", "causal"), [(7, 7, True), (5, 11, False), (9, 4, True)])
def test_alibi_is_flash_attn_bias(seed, q_len, k_len, causal):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(2, q_len, 4, 8, g=g), rand(2, k_len, 2, 8, g=g), rand(2, k_len, 2, 8, g=g)
    slopes = torch.rand(4, generator=g, dtype=torch.float64).float() + 0.1
    out = fa.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes)
    torch.testing.assert_close(out, naive(q, k, v, causal=causal, alibi=slopes)[0])


class TestNotSupported:
    def setup_method(self):
        self.q = self.k = self.v = torch.randn(1, 4, 2, 8)

    def test_alibi_while_decoding(self):
        cache = torch.randn(1, 8, 2, 8)
        with pytest.raises(NotImplementedError, match="alibi_slopes"):
            fa.flash_attn_with_kvcache(self.q, cache, cache, cache_seqlens=4, alibi_slopes=torch.ones(2))

    def test_attention_probabilities_under_dropout(self):
        with pytest.raises(NotImplementedError, match="return_attn_probs"):
            fa.flash_attn_func(self.q, self.k, self.v, dropout_p=0.1, return_attn_probs=True)

    def test_paged_kv(self):
        cu = torch.tensor([0, 4], dtype=torch.int32)
        q = self.q[0]
        with pytest.raises(NotImplementedError, match="block_table"):
            fa.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))

    def test_kvcache_leftpad_and_rotary_placements(self):
        cache = torch.randn(2, 16, 2, 8)
        q, new = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
        cos, sin = torch.ones(20, 4), torch.zeros(20, 4)
        with pytest.raises(NotImplementedError, match="cache_leftpad"):
            fa.flash_attn_with_kvcache(
                q, cache, cache, cache_seqlens=2, cache_leftpad=torch.zeros(2, dtype=torch.int32)
            )
        with pytest.raises(NotImplementedError, match="cache_seqlens"):  # flash-attn puts all three at one position
            fa.flash_attn_with_kvcache(q, cache, cache, new, new, cos, sin, cache_seqlens=2)


def test_kvcache_is_flash_attention_with_kvcache_under_flash_attn_names():
    """Same result and same in-place append as flash.attention_with_kvcache, with flash-attn's defaults
    (interleaved rotary) and its window convention."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 4, 16, generator=gen) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    caches = [torch.randn(6, 4, 2, 16, generator=gen) for _ in range(2)]
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    angles = torch.arange(12.0)[:, None] * torch.rand(8, generator=gen)[None, :]
    theirs = [c.clone() for c in caches]
    out, lse = fa.flash_attn_with_kvcache(
        q, *theirs, k, v, angles.cos(), angles.sin(), cache_seqlens=lengths, block_table=table, causal=True,
        window_size=(6, 3), return_softmax_lse=True,
    )  # fmt: skip
    want, want_lse = flash.attention_with_kvcache(
        q, *caches, k, v, cache_seqlens=lengths, block_table=table, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
        rotary_interleaved=True, window=(6, 0), return_lse=True,
    )  # fmt: skip
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert all(torch.equal(a, b) for a, b in zip(theirs, caches))


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda q: fa.flash_attn_func(q, q, q, window_size=(-2, 0)), "window_size"),
        (lambda q: fa.flash_attn_func(q, q, q, window_size=3), "window_size"),
        (fa.flash_attn_qkvpacked_func, "qkv"),
        (lambda q: fa.flash_attn_kvpacked_func(q, q), "kv"),
        (lambda q: fa.flash_attn_func(q, q, q, softcap=-1.0), "softcap"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(InvalidInputError) as caught:
        call(torch.randn(1, 4, 2, 8))
    assert caught.value.argument == argument


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_varlen_gqa_under_the_tolerance_rule(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 100, 357, 500], dtype=torch.int32, device="cuda")
    q = rand(500, 8, 64, g=g).to("cuda", dtype)
    k, v = rand(500, 2, 64, g=g).to("cuda", dtype), rand(500, 2, 64, g=g).to("cuda", dtype)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 257, 257, causal=True, window_size=(64, 0), softcap=30.0)
    assert flash.explain(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu).forward.chosen != "reference"
    for b in range(3):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        args = (q[None, rows], k[None, rows], v[None, rows])
        options = {"causal": True, "window": (64, 0), "softcap": 30.0}
        oracle, low = naive(*args, **options)[0], naive(*args, **options, dtype=dtype)[0]
        assert_within_rule(f"sequence {b}", out[None, rows], oracle, low, dtype)
