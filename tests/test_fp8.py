"""fp8 attention: the quantising helper, and the accuracy test of the FlashAttention-3 paper.

Accuracy (issue 13): inputs N(0, 1) with 0.1% outliers of scale 10; every backend that declares fp8
forwards is compared with the float64 oracle on the original (unquantised) inputs, by RMSE, next to
the naive fp8 computation: one scale per tensor, scores and softmax in float32, the probabilities
rounded to e4m3 for P V as an fp8 matrix product takes them. A backend must not do worse.
"""

from __future__ import annotations

import pytest
import torch

import flash
from flash import InvalidInputError
from flash.reference.naive import naive_attention
from flash.registry import REGISTRY

E4M3 = torch.float8_e4m3fn


def fp8_backends() -> list[str]:
    names = []
    for info in flash.backends():
        if REGISTRY.unavailable_reasons(info.name):
            continue
        support = REGISTRY.get(info.name).forward_support
        if E4M3 in support.dtypes and "fp8" in support.features:
            names.append(info.name)
    return names


def with_outliers(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    outliers = torch.rand(shape, generator=gen, dtype=torch.float64) < 1e-3
    return torch.where(outliers, t * 10, t)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def naive_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Per-tensor scaled fp8 inputs, float32 softmax, probabilities rounded to e4m3 before P V."""
    (q8, qd), (k8, kd), (v8, vd) = (flash.fp8.quantize(t, granularity="tensor") for t in (q, k, v))
    qf, kf, vf = (t8.float() * d for t8, d in ((q8, qd), (k8, kd), (v8, vd)))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * q.shape[-1] ** -0.5
    if causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1 + k.shape[1] - q.shape[1])
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(E4M3).float()
    return torch.einsum("bhqk,bkhd->bqhd", p, vf)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_is_no_less_accurate_than_naive_fp8(causal: bool) -> None:
    backends = fp8_backends()
    assert "reference" in backends
    gen = torch.Generator().manual_seed(13)
    q, k, v = (with_outliers((2, 96, 4, 64), gen) for _ in range(3))
    oracle = naive_attention(q, k, v, causal=causal)
    baseline = rmse(naive_fp8(q.float(), k.float(), v.float(), causal), oracle)
    (q8, qd), (k8, kd), (v8, vd) = (flash.fp8.quantize(t) for t in (q, k, v))
    for name in backends:
        out = flash.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=causal, backend=name)
        error = rmse(out, oracle)
        assert error <= baseline, f"{name}: RMSE {error:.3g} above naive fp8's {baseline:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_kernels_on_the_gpu(causal: bool) -> None:
    """The same accuracy test at a real size on the GPU, for the GPU backends that declare fp8."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backends = [name for name in fp8_backends() if name != "reference"]
    if not backends:
        pytest.skip("no GPU backend declares fp8 forwards")
    gen = torch.Generator().manual_seed(14)
    q, k, v = (with_outliers((2, 1000, 8, 128), gen) for _ in range(3))
    oracle = naive_attention(q.cuda(), k.cuda(), v.cuda(), causal=causal).cpu()
    baseline = rmse(naive_fp8(q.float(), k.float(), v.float(), causal), oracle)
    (q8, qd), (k8, kd), (v8, vd) = (flash.fp8.quantize(t.cuda()) for t in (q, k, v))
    for name in backends:
        reasons = flash.explain(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, backend=name)
        out = flash.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=causal, backend=name)
        error = rmse(out.cpu(), oracle)
        assert error <= baseline, f"{name}: RMSE {error:.3g} above naive fp8's {baseline:.3g}\n{reasons}"


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_quantize_per_head_round_trip(layout: str) -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(2, 9, 3, 16, generator=gen) * torch.tensor([0.01, 1.0, 300.0])[None, None, :, None]
    if layout == "bhsd":
        t = t.transpose(1, 2)
    t8, descale = flash.fp8.quantize(t, layout=layout)
    assert t8.dtype == E4M3 and descale.shape == (2, 3) and descale.dtype == torch.float32
    per_head = descale[:, :, None, None] if layout == "bhsd" else descale[:, None, :, None]
    heads_axis = (2, 3) if layout == "bhsd" else (1, 3)
    amax = t.abs().amax(dim=heads_axis, keepdim=True)
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, relative to its head's largest
    assert ((t8.float() * per_head - t).abs() <= amax * 2.0**-4).all()
    assert torch.equal(t8.float().abs().amax(dim=heads_axis), torch.full((2, 3), 448.0))


def test_quantize_per_tensor_and_e5m2() -> None:
    t = torch.randn(40, 2, 8, dtype=torch.bfloat16)  # a varlen (total, heads, head_dim) tensor
    t8, descale = flash.fp8.quantize(t, dtype=torch.float8_e5m2, granularity="tensor")
    assert t8.dtype == torch.float8_e5m2 and descale.shape == ()
    assert ((t8.float() * descale - t.float()).abs() <= t.float().abs().amax() * 2.0**-3).all()


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: flash.fp8.quantize(torch.ones(2, 3, 4, 5, dtype=E4M3)), "t"),
        (lambda: flash.fp8.quantize(torch.ones(2, 3, 4, 5), dtype=torch.bfloat16), "dtype"),
        (lambda: flash.fp8.quantize(torch.ones(3, 4, 5)), "t"),
        (lambda: flash.fp8.quantize(torch.ones(2, 3, 4, 5), granularity="row"), "granularity"),  # type: ignore[arg-type]
        (lambda: flash.fp8.quantize(torch.ones(2, 3, 4, 5), layout="sbhd"), "layout"),  # type: ignore[arg-type]
    ],
)
def test_quantize_names_the_bad_argument(call, argument: str) -> None:
    with pytest.raises(InvalidInputError, match=argument):
        call()
