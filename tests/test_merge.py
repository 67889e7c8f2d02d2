"""flash.merge_states: exact merging of partial attention results by their LSE."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import flash
from flash.errors import InvalidInputError
from flash.spec import build_spec
from flash.testing import assert_within_rule, dense_attention, naive_dtype


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _key_split_causal(q, k, v, cut: int, **options):
    """Causal attention of all queries over keys [0, cut) and [cut, N), as two flash.attention calls.

    Bottom-right alignment: part one is the window (-1, N - cut), part two plain causal (rows
    before ``cut`` see none of its keys: LSE -inf there).
    """
    n = q.shape[1]
    first = flash.attention(q, k[:, :cut], v[:, :cut], window=(-1, n - cut), return_lse=True, **options)
    second = flash.attention(q, k[:, cut:], v[:, cut:], causal=True, return_lse=True, **options)
    return first, second


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_of_key_parts_is_the_attention_of_all_keys(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, 2, 37, 4, 24, dtype=dtype)
    k, v = _randn(gen, 2, 37, 2, 24, dtype=dtype), _randn(gen, 2, 37, 2, 24, dtype=dtype)
    (out1, lse1), (out2, lse2) = _key_split_causal(q, k, v, 13, softcap=2.0, backend="reference")
    assert torch.isinf(lse2[:, :, :13]).all()  # the split really has rows that see nothing in a part
    out, lse = flash.merge_states([out1, out2], [lse1, lse2])
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    spec = build_spec(q, k, v, causal=True, softcap=2.0)
    oracle = dense_attention(spec, q, k, v, compute_dtype=torch.float64)
    naive = dense_attention(spec, q, k, v, compute_dtype=naive_dtype(dtype))
    assert_within_rule("merged out", out, oracle[0], naive[0], dtype)
    assert_within_rule("merged lse", lse, oracle[1], naive[1], dtype)


def test_many_parts_varlen_and_stacked(seed: int) -> None:
    """Four key parts of a packed varlen batch ((total, heads, d) with (heads, total) LSEs), stacked."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 5, 21], dtype=torch.int32)
    q = _randn(gen, 21, 3, 16, dtype=torch.float32)
    parts_k = [_randn(gen, 21, 3, 16, dtype=torch.float32) for _ in range(4)]
    parts_v = [_randn(gen, 21, 3, 16, dtype=torch.float32) for _ in range(4)]
    results = [
        flash.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True, backend="reference")
        for k, v in zip(parts_k, parts_v)
    ]
    out, lse = flash.merge_states(torch.stack([o for o, _ in results]), torch.stack([x for _, x in results]))
    k, v = torch.cat(parts_k), torch.cat(parts_v)
    # The same keys, per sequence, in one call: sequence b's keys are its rows of every part.
    order = torch.cat([torch.arange(a, b) + p * 21 for a, b in ((0, 5), (5, 21)) for p in range(4)])
    cu_k = torch.tensor([0, 20, 84], dtype=torch.int32)
    whole, whole_lse = flash.attention(
        q, k[order], v[order], cu_seqlens_q=cu, cu_seqlens_k=cu_k, return_lse=True, backend="reference"
    )
    torch.testing.assert_close(out, whole, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, whole_lse, atol=2e-6, rtol=2e-6)


def test_rows_that_see_nothing_anywhere_are_zero_and_minus_inf() -> None:
    outs = torch.randn(3, 2, 4, 2, 8, dtype=torch.float64)
    lses = torch.randn(3, 2, 2, 4, dtype=torch.float64)
    lses[:, 1, 0, 2] = float("-inf")  # row 2 of head 0 of batch 1: no part sees a key
    outs[:, 1, 2, 0] = 0.0  # (what every backend outputs for such a row)
    lses[1, 0, 1, 3] = float("-inf")  # one part of another row sees nothing
    outs.requires_grad_()
    lses.requires_grad_()
    out, lse = flash.merge_states(outs, lses)
    assert lse[1, 0, 2] == float("-inf") and torch.equal(out[1, 2, 0], torch.zeros(8, dtype=torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(lse[lse != float("-inf")]).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert outs.grad is not None and lses.grad is not None
    assert torch.isfinite(outs.grad).all() and torch.isfinite(lses.grad).all()
    assert (lses.grad[:, 1, 0, 2] == 0).all()  # nothing flows into a row that saw nothing


def test_merge_is_exact_in_float64() -> None:
    """Against the definition, term by term, where the result is well-conditioned."""
    outs = [torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3)]
    lses = [torch.randn(2, 3, 5, dtype=torch.float64) * 30 for _ in range(3)]  # wide range: needs the shift
    out, lse = flash.merge_states(outs, lses)
    expected_lse = torch.logsumexp(torch.stack(lses), dim=0)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-14, atol=1e-12)
    expected = sum(torch.exp(x - expected_lse).transpose(1, 2).unsqueeze(-1) * o for o, x in zip(outs, lses))
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_one_part_is_itself_and_bhsd_is_bshd_transposed() -> None:
    out = torch.randn(2, 7, 3, 5)
    lse = torch.randn(2, 3, 7)
    merged, merged_lse = flash.merge_states([out], [lse])
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    outs = [torch.randn(2, 3, 7, 5) for _ in range(2)]
    lses = [torch.randn(2, 3, 7) for _ in range(2)]
    bhsd, bhsd_lse = flash.merge_states(outs, lses, layout="bhsd")
    bshd, bshd_lse = flash.merge_states([o.transpose(1, 2) for o in outs], lses)
    assert torch.equal(bhsd.transpose(1, 2), bshd) and torch.equal(bhsd_lse, bshd_lse)


def test_gradcheck() -> None:
    outs = [torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(1, 2, 4, dtype=torch.float64) for _ in range(3)]
    lses[2][0, 1, 1] = float("-inf")
    lses = [x.requires_grad_() for x in lses]

    def merged(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = flash.merge_states(list(tensors[:3]), list(tensors[3:]))
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(merged, (*outs, *lses))


def test_half_precision_parts_are_merged_in_float32() -> None:
    """Two bf16 halves of the same value merge to that value; a bf16 merge of the weights would not."""
    out = torch.randn(1, 64, 1, 8).to(torch.bfloat16)
    lse = torch.randn(1, 1, 64)
    merged, merged_lse = flash.merge_states([out, out], [lse, lse])
    assert torch.equal(merged, out)
    torch.testing.assert_close(merged_lse, lse + torch.log(torch.tensor(2.0)), atol=1e-6, rtol=0)


def test_invalid_inputs_name_the_argument() -> None:
    out, lse = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 5)
    cases: list[tuple[tuple[Any, Any], dict[str, Any], str]] = [
        (([], []), {}, "outs"),
        (("x", [lse]), {}, "outs"),
        (([out, "x"], [lse, lse]), {}, "outs[1]"),
        (([out], [lse, lse]), {}, "lses"),
        (([out, out[:, :4]], [lse, lse]), {}, "outs[1]"),
        (([out, out.double()], [lse, lse]), {}, "outs[1]"),
        (([out], [lse.transpose(1, 2)]), {}, "lses[0]"),
        (([out], [lse.half()]), {}, "lses[0]"),
        (([out], [lse]), {"layout": "sbhd"}, "layout"),
        (([out.to(torch.int32)], [lse]), {}, "outs"),
        (([torch.randn(4, 2)], [torch.randn(4)]), {}, "outs"),
    ]
    for (outs, lses), options, argument in cases:
        with pytest.raises(InvalidInputError) as caught:
            flash.merge_states(outs, lses, **options)
        assert caught.value.argument == argument, (argument, caught.value)
