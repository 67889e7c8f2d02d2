"""flash.padding: unpad / pad round trips, position-id packing, and the varlen path they feed."""

from __future__ import annotations

import pytest
import torch

import flash
from flash import InvalidInputError


def random_mask(batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(batch, seqlen, generator=generator) > 0.4


class TestUnpad:
    def test_keeps_real_tokens_in_order(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 7, 2, 4, generator=g)
        mask = random_mask(3, 7, g)
        mask[1] = False  # an empty sequence
        packed = flash.unpad(x, mask)
        lengths = mask.sum(1)
        assert packed.cu_seqlens.dtype == torch.int32
        assert packed.cu_seqlens.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
        assert packed.max_seqlen == int(lengths.max())
        want = torch.cat([x[b][mask[b]] for b in range(3)])
        torch.testing.assert_close(packed.values, want, rtol=0, atol=0)

    def test_pad_inverts_unpad_with_zeros_elsewhere(self, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 6, 3, generator=g)
        mask = random_mask(4, 6, g).to(torch.int64)  # integer masks work too
        packed = flash.unpad(x, mask)
        back = flash.pad(packed.values, packed.indices, 4, 6)
        torch.testing.assert_close(back, x * mask[..., None], rtol=0, atol=0)

    def test_gradients_flow_through_both(self):
        x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
        packed = flash.unpad(x, mask)
        flash.pad(packed.values * 2, packed.indices, 2, 5).sum().backward()
        torch.testing.assert_close(x.grad, 2.0 * mask[..., None].to(x.dtype).expand(2, 5, 3))

    def test_select_tokens_from_a_strided_view(self, seed):
        g = torch.Generator().manual_seed(seed)
        bhsd = torch.randn(3, 2, 7, 4, generator=g)  # transformers' layout; tokens are not rows in memory
        x = bhsd.transpose(1, 2)
        info = flash.unpad_indices(random_mask(3, 7, g))
        got = flash.select_tokens(x, info.indices)
        torch.testing.assert_close(got, x.reshape(21, 2, 4)[info.indices], rtol=0, atol=0)
        with pytest.raises(InvalidInputError, match="x"):
            flash.select_tokens(torch.zeros(3), info.indices)

    def test_given_max_seqlen_is_used(self):
        assert flash.unpad_indices(torch.ones(2, 4, dtype=torch.bool), max_seqlen=9).max_seqlen == 9

    @pytest.mark.parametrize(
        ("x", "mask", "argument"),
        [
            (torch.zeros(2, 3), torch.ones(2, 3), "attention_mask"),  # float mask
            (torch.zeros(2, 3), torch.ones(2, 3, 1, dtype=torch.bool), "attention_mask"),
            (torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool), "x"),
            ("not a tensor", torch.ones(2, 3, dtype=torch.bool), "x"),
        ],
    )
    def test_bad_input_names_the_argument(self, x, mask, argument):
        with pytest.raises(InvalidInputError) as caught:
            flash.unpad(x, mask)
        assert caught.value.argument == argument

    def test_pad_checks_its_arguments(self):
        x, indices = torch.zeros(3, 2), torch.tensor([0, 2, 5])
        with pytest.raises(InvalidInputError, match="indices"):
            flash.pad(x, indices[:2], 2, 3)
        with pytest.raises(InvalidInputError, match="batch"):
            flash.pad(x, indices, -1, 3)
        with pytest.raises(InvalidInputError, match="max_seqlen"):
            flash.unpad_indices(torch.ones(2, 3, dtype=torch.bool), max_seqlen=-2)


class TestPositionIds:
    def test_restarts_and_rows_start_sequences(self):
        position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
        cu, longest = flash.cu_seqlens_from_position_ids(position_ids)
        assert cu.dtype == torch.int32
        assert cu.tolist() == [0, 3, 5, 6, 10, 12]
        assert longest == 4

    def test_one_dimensional_and_given_max(self):
        cu, longest = flash.cu_seqlens_from_position_ids(torch.tensor([0, 1, 0, 1, 2]), max_seqlen=7)
        assert cu.tolist() == [0, 2, 5] and longest == 7

    @pytest.mark.parametrize("bad", [torch.zeros(2, 3), torch.zeros(1, 2, 3, dtype=torch.long), [0, 1]])
    def test_bad_position_ids(self, bad):
        with pytest.raises(InvalidInputError, match="position_ids"):
            flash.cu_seqlens_from_position_ids(bad)


def test_unpadded_attention_equals_per_sequence_attention(seed):
    """What the helpers are for: a padded batch through the varlen path, row by row equal to each
    sequence attended alone."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 8, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[2, 5:] = False  # right padding
    info = flash.unpad_indices(mask)
    packed = [flash.select_tokens(t, info.indices) for t in (q, k, v)]
    out = flash.attention(
        *packed, causal=True, cu_seqlens_q=info.cu_seqlens, cu_seqlens_k=info.cu_seqlens,
        max_seqlen_q=info.max_seqlen, max_seqlen_k=info.max_seqlen,
    )  # fmt: skip
    padded = flash.pad(out, info.indices, 3, 8)
    for b in range(3):
        real = mask[b]
        alone = flash.attention(q[b : b + 1, real], k[b : b + 1, real], v[b : b + 1, real], causal=True)
        torch.testing.assert_close(padded[b, real], alone[0])
        assert not padded[b, ~real].any()
