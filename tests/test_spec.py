"""Validation: bad input is rejected before any kernel runs, naming the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import flash
from flash import InvalidInputError
from flash.backend import FEATURES, Backend, Support
from flash.registry import REGISTRY
from flash.spec import SUPPORTED_DTYPES


def qkv(b=2, sq=5, sk=7, hq=4, hkv=2, d=8, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
        torch.randn(b, sk, hkv, d, dtype=dtype),
    )


def varlen(lens_q=(3, 0, 5), lens_k=(2, 4, 1), h=2, d=8):
    q, k, v = torch.randn(sum(lens_q), h, d), torch.randn(sum(lens_k), h, d), torch.randn(sum(lens_k), h, d)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


class SpyBackend(Backend):
    """Accepts everything and records whether it ever ran: validation must stop bad calls before it."""

    name = "spy"
    priority = 10_000
    calls = 0

    forward_support = Support(dtypes=frozenset(SUPPORTED_DTYPES), features=FEATURES, devices=frozenset({"cpu"}))

    def forward(self, spec, args, config):
        SpyBackend.calls += 1
        args.out.zero_()
        args.lse.zero_()


@pytest.fixture(autouse=True)
def spy():
    REGISTRY.register(SpyBackend())
    SpyBackend.calls = 0
    yield
    REGISTRY.unregister("spy")
    assert SpyBackend.calls == 0, "a kernel ran on invalid input"


def rejects(argument: str, *args, **kwargs) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        flash.attention(*args, **kwargs)
    assert info.value.argument == argument, str(info.value)
    assert "expected" in str(info.value) and "got" in str(info.value)
    return info.value


def test_not_a_tensor():
    q, k, v = qkv()
    rejects("q", q.tolist(), k, v)


def test_wrong_rank_names_the_layout():
    q, k, v = qkv()
    err = rejects("k", q, k[0], v)
    assert "(batch, seqlen, heads, head_dim)" in str(err)


def test_unsupported_dtype():
    q, k, v = qkv()
    rejects("q", q.to(torch.int32), k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    err = rejects("k", q, k.double(), v)
    assert "float32" in str(err) and "float64" in str(err)


def test_device_mismatch():
    q, k, v = qkv()
    rejects("v", q, k, v.to("meta"))


def test_last_dim_stride():
    _q, k, v = qkv()
    q_t = torch.randn(2, 5, 8, 4).transpose(2, 3)  # head_dim stride 4
    err = rejects("q", q_t, k, v)
    assert "contiguous" in str(err)


def test_k_v_shapes_differ():
    q, k, v = qkv()
    rejects("v", q, k, v[:, :6])


def test_head_dims_differ_and_too_large():
    q, k, v = qkv()
    rejects("k", q, k[..., :4], v[..., :4])
    q, k, v = qkv(d=257)
    rejects("q", q, k, v)


def test_heads_not_divisible():
    q, k, v = qkv(hq=5, hkv=2)
    err = rejects("k", q, k, v)
    assert "divides" in str(err) and "2 heads" in str(err)


def test_batch_mismatch():
    q, _, _ = qkv()
    _, k, v = qkv(b=3)
    rejects("k", q, k, v)


def test_layout_value():
    rejects("layout", *qkv(), layout="sbhd")


@pytest.mark.parametrize(
    "options, argument",
    [
        ({"causal": 1}, "causal"),
        ({"window": (3,)}, "window"),
        ({"window": (-2, 0)}, "window"),
        ({"window": (1.5, 2)}, "window"),
        ({"causal": True, "window": (4, 3)}, "window"),
        ({"softcap": -1.0}, "softcap"),
        ({"softcap": float("inf")}, "softcap"),
        ({"scale": 0.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"dropout_p": 0.1}, "dropout_seed"),
        ({"dropout_p": 0.1, "dropout_seed": -5}, "dropout_seed"),
        ({"deterministic": "yes"}, "deterministic"),
        ({"max_seqlen_q": 4}, "max_seqlen_q"),
    ],
)
def test_option_ranges(options, argument):
    rejects(argument, *qkv(), **options)


def test_descale_needs_fp8_and_right_shape():
    q, k, v = qkv()
    rejects("q_descale", q, k, v, q_descale=torch.ones(()))
    f8 = [t.to(torch.float8_e4m3fn) for t in qkv()]
    rejects("k_descale", *f8, k_descale=torch.ones(3))
    rejects("q_descale", *f8, q_descale=torch.ones((), dtype=torch.float64))
    rejects("q_descale", *f8, q_descale=torch.ones(()), k_descale=torch.ones(2, 2))


class TestVarlen:
    def test_needs_both_offsets(self):
        q, k, v, cu_q, _ = varlen()
        rejects("cu_seqlens_k", q, k, v, cu_seqlens_q=cu_q)

    def test_offsets_int32(self):
        q, k, v, cu_q, cu_k = varlen()
        rejects("cu_seqlens_q", q, k, v, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)

    def test_offsets_monotonic(self):
        q, k, v, _, cu_k = varlen()
        bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
        err = rejects("cu_seqlens_q", q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu_k)
        assert "non-decreasing" in str(err)

    def test_offsets_end_at_token_count(self):
        q, k, v, _, cu_k = varlen()
        bad = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
        err = rejects("cu_seqlens_q", q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu_k)
        assert "token count 8" in str(err)

    def test_offsets_start_at_zero(self):
        q, k, v, _, cu_k = varlen()
        bad = torch.tensor([1, 3, 3, 8], dtype=torch.int32)
        rejects("cu_seqlens_q", q, k, v, cu_seqlens_q=bad, cu_seqlens_k=cu_k)

    def test_same_batch(self):
        q, k, v, cu_q, _ = varlen()
        rejects("cu_seqlens_k", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))

    def test_max_seqlen_at_least_longest(self):
        q, k, v, cu_q, cu_k = varlen()
        err = rejects("max_seqlen_q", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4)
        assert "longest sequence (5)" in str(err)

    def test_rank(self):
        q, k, v, cu_q, cu_k = varlen()
        rejects("q", q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_spec_is_hashable_and_describes_the_problem():
    q, k, v = qkv()
    spec = flash.build_spec(q, k, v, causal=True, window=(3, -1), softcap=2.0)
    assert hash(spec) == hash(flash.build_spec(q, k, v, causal=True, window=(3, -1), softcap=2.0))
    assert spec.group_size == 2 and spec.mask_bounds == (3, 0)
    assert spec.features() == {"causal", "window", "softcap", "gqa"}
    assert spec.scale == pytest.approx(8**-0.5)
    assert spec.q_strides == q.stride()


def test_bhsd_strides_are_canonical():
    q = torch.randn(2, 4, 5, 8)  # (b, h, s, d)
    spec = flash.build_spec(q, q, q, layout="bhsd")
    assert (spec.seqlen_q, spec.heads_q) == (5, 4)
    assert spec.q_strides == (q.stride(0), q.stride(2), q.stride(1), q.stride(3))
