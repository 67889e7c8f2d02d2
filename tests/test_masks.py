"""Mask and score options in core: validation, block masks, plan caching, gradients, the PyTorch drop-ins.

The conformance suite checks every backend's results for each option (``mask_cases``); these tests
check what is not a result: errors name their argument, a BlockMask summarises its mask exactly,
plans are keyed by layout and never by values, and the drop-ins send masks to flash.
"""

from __future__ import annotations

import pytest
import torch

import flash
from flash import mods, plan
from flash.block_mask import FULL, HIDDEN, PARTIAL, BlockMask, block_states
from flash.errors import InvalidInputError
from flash.plan import CallMasks
from flash.reference.oracle import dense_attention
from flash.testing import mod_examples

B, S, H, D = 2, 24, 2, 16


def _qkv(dtype=torch.float64, requires_grad=False, seqlen=S):
    gen = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(B, seqlen, H, D, dtype=dtype, generator=gen).requires_grad_(requires_grad) for _ in range(3)
    )


# ----------------------------------------------------------------------------- validation


def _expect(argument: str, **options) -> None:
    q, k, v = _qkv()
    with pytest.raises(InvalidInputError) as caught:
        flash.attention(q, k, v, backend="reference", **options)
    assert caught.value.argument == argument, str(caught.value)


def _bad_score_mod(score, b, h, q_idx, kv_idx):
    return score.no_such_method()


def test_bad_mask_arguments_are_named() -> None:
    _expect("attn_mask", attn_mask=torch.ones(B, H, S, S + 1, dtype=torch.bool))  # does not broadcast
    _expect("attn_mask", attn_mask=torch.ones(3, 1, S, S, dtype=torch.bool))
    _expect("attn_mask", attn_mask=torch.ones(S, S, dtype=torch.int32))
    _expect("attn_mask", attn_mask=torch.ones(S, dtype=torch.bool))
    _expect("attn_mask", attn_mask=torch.ones(S, S, dtype=torch.bool, device="meta"))
    _expect("alibi_slopes", alibi_slopes=torch.ones(H + 1))
    _expect("alibi_slopes", alibi_slopes=torch.ones(H, dtype=torch.float64))
    _expect("score_mod", score_mod=lambda score: score)  # wrong arity
    _expect("score_mod", score_mod=_bad_score_mod)
    _expect("score_mod_grad", score_mod_grad=mod_examples.softcap_grad)  # without a score_mod
    _expect("mask_mod", mask_mod=lambda b, h, q_idx, kv_idx: q_idx * 1.0)  # not boolean
    _expect("block_mask", block_mask=torch.ones(1))
    other = BlockMask.from_mask_mod(mod_examples.prefix_lm, batch=None, heads=None, seqlen_q=S, seqlen_k=S + 16,
                                    block_size=(16, 16))  # fmt: skip
    _expect("block_mask", block_mask=other)
    same = BlockMask.from_mask_mod(mod_examples.prefix_lm, batch=None, heads=None, seqlen_q=S, seqlen_k=S,
                                   block_size=(16, 16))  # fmt: skip
    _expect("attn_mask", block_mask=same, attn_mask=torch.ones(S, S, dtype=torch.bool))
    _expect("mask_mod", block_mask=same, mask_mod=mod_examples.local_global)
    with pytest.raises(InvalidInputError) as caught:
        BlockMask.from_dense(torch.ones(S, S, dtype=torch.bool), block_size=(24, 16))
    assert caught.value.argument == "block_size"


def test_a_mask_with_varlen_is_refused() -> None:
    q = torch.randn(10, H, D)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(InvalidInputError) as caught:
        flash.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, attn_mask=torch.ones(6, 6, dtype=torch.bool))
    assert caught.value.argument == "attn_mask"


# ----------------------------------------------------------------------------- block masks


def test_block_states_match_a_brute_force_summary() -> None:
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 45, 70, generator=gen) > 0.2
    mask[0, 0, :16, :16] = False  # one hidden block
    mask[1, 0, 16:32, 16:32] = True  # one full block
    states = block_states(mask, 45, 70, (16, 16))
    for b in range(2):
        for i in range(3):
            for j in range(5):
                tile = mask[b, 0, i * 16 : i * 16 + 16, j * 16 : j * 16 + 16]
                tail = tile.shape != (16, 16)
                want = HIDDEN if not tile.any() else (FULL if tile.all() and not tail else PARTIAL)
                assert states[b, 0, i, j] == want, (b, i, j)
    assert states[0, 0, 0, 0] == HIDDEN and states[1, 0, 1, 1] == FULL


def test_block_mask_from_mask_mod_equals_from_dense() -> None:
    rows, cols = torch.arange(70)[:, None], torch.arange(70)[None, :]
    dense = mod_examples.local_global(0, 0, rows, cols)
    a = BlockMask.from_mask_mod(mod_examples.local_global, batch=None, heads=None, seqlen_q=70, seqlen_k=70,
                                block_size=(16, 32))  # fmt: skip
    b = BlockMask.from_dense(dense, block_size=(16, 32))
    assert torch.equal(a.states, b.states)
    assert torch.equal(a.lists.kv_indices, b.lists.kv_indices) and torch.equal(a.lists.q_counts, b.lists.q_counts)
    assert a.density == pytest.approx((a.states != HIDDEN).float().mean().item()) and 0.0 < a.density < 1.0
    assert "density" in repr(a)


def test_block_mask_from_document_ids_equals_from_dense() -> None:
    """Per-sequence ids (any order, a document need not be contiguous), causal or not: the same blocks as
    the dense mask, and the same results on the reference backend."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 3, (B, 45), generator=gen)
    rows, cols = torch.arange(45)[:, None], torch.arange(45)[None, :]
    for causal in (True, False):
        dense = (ids[:, None, :, None] == ids[:, None, None, :]) & ((cols <= rows) | (not causal))
        a = BlockMask.from_document_ids(ids, causal=causal, block_size=(16, 32))
        b = BlockMask.from_dense(dense, block_size=(16, 32))
        assert torch.equal(a.states, b.states) and a.info.documents and not b.info.documents
        q, k, v = _qkv(seqlen=45)
        got, want = (flash.attention(q, k, v, block_mask=m, backend="reference") for m in (a, b))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_document_runs_are_each_querys_visible_keys() -> None:
    """Documents that are runs of tokens: each query's run is exactly the keys its dense row shows (causal
    or not); a document split in two has no runs (the kernels then compare ids)."""
    ids = torch.tensor([[0, 0, 0, 7, 7, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 1, 1, 1]])
    rows, cols = torch.arange(9)[:, None], torch.arange(9)[None, :]
    for causal in (True, False):
        runs = BlockMask.from_document_ids(ids, causal=causal, block_size=(16, 16)).key_intervals
        assert runs is not None and runs.dtype == torch.int32
        dense = (ids[:, :, None] == ids[:, None, :]) & ((cols <= rows) | (not causal))
        inside = (cols >= runs[:, 0, :, None]) & (cols < runs[:, 1, :, None])
        assert torch.equal(inside, dense)
    split = BlockMask.from_document_ids(torch.tensor([0, 0, 1, 1, 0]))
    assert split.key_intervals is None and split.document_ids is not None


def _prefix_lm(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return (kv <= q) | (kv < 37)


def _every_other_key(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv % 2 == 0


def _per_head(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv <= q + h


def _shrinking(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv >= q * 0 + 90 - q  # one interval per query, but its start moves left


@pytest.mark.parametrize("build", ["mask_mod", "dense"])
def test_key_intervals_are_found_exactly_where_every_query_sees_one_run(build: str) -> None:
    """A prefix-LM mask (causal plus a 37-token prefix) is one interval per query with ends that never
    move left: its key_intervals reproduce the dense mask and spec features report "key_intervals";
    holes, a mask that differs per head, and a start that moves left give none ("block_mask")."""
    sq = sk = 101
    rows, cols = torch.arange(sq)[:, None], torch.arange(sk)[None, :]

    def make(mod: object, heads: int | None = None) -> BlockMask:
        if build == "dense":
            dense = mod(None, torch.arange(heads or 1)[:, None, None], rows, cols)  # type: ignore[operator]
            return BlockMask.from_dense(dense.expand(heads or 1, sq, sk)[None].contiguous(), block_size=(32, 32))
        return BlockMask.from_mask_mod(mod, batch=None, heads=heads, seqlen_q=sq, seqlen_k=sk,  # type: ignore[arg-type]
                                       block_size=(32, 32))  # fmt: skip

    found = make(_prefix_lm)
    runs = found.key_intervals
    assert runs is not None and runs.shape == (1, 2, sq) and found.info.intervals
    assert torch.equal((cols >= runs[0, 0, :, None]) & (cols < runs[0, 1, :, None]), _prefix_lm(None, None, rows, cols))
    q, k, v = _qkv(seqlen=sq)
    assert "key_intervals" in str(flash.explain(q, k, v, block_mask=found))
    for mod, heads in ((_every_other_key, None), (_per_head, 2), (_shrinking, None)):
        other = make(mod, heads)
        assert other.key_intervals is None and not other.info.intervals, mod


@pytest.mark.parametrize(
    ("argument", "value", "options"),
    [
        ("document_ids", torch.zeros(2, 3, 4, dtype=torch.int64), {}),
        ("document_ids", torch.zeros(8), {}),
        ("document_ids", torch.zeros(8, dtype=torch.bool), {}),
        ("document_ids", [0, 0, 1], {}),
        ("causal", torch.zeros(8, dtype=torch.int64), {"causal": 1}),
        ("block_size", torch.zeros(8, dtype=torch.int64), {"block_size": (16, 24)}),
    ],
)
def test_bad_document_ids_are_named(argument: str, value: object, options: dict) -> None:
    with pytest.raises(InvalidInputError) as caught:
        BlockMask.from_document_ids(value, **options)  # type: ignore[arg-type]
    assert caught.value.argument == argument


def test_document_mask_tile_counts_at_the_benchmark_size() -> None:
    """The benchmark's document mask (8k tokens, 12 documents, causal) in 128 x 128 blocks: 340 of 4096
    blocks visited, half of them partial. A forward tile is 128 x 64, so it walks 680 tiles per
    (sequence, head), 340 masked; from the ids, a masked tile loads 128 + 64 ids where the dense
    BlockMask loads 128 x 64 mask bytes (2.7 MB per (sequence, head) of a 64 MB mask)."""
    from flash_bench.sections.masks import DOCUMENTS, _doc_ids

    ids = _doc_ids(8192, "cpu")
    assert int(ids.max()) + 1 == DOCUMENTS
    mask = BlockMask.from_document_ids(ids, causal=True)
    counts = [int((mask.states == kind).sum()) for kind in (HIDDEN, PARTIAL, FULL)]
    assert counts == [3756, 170, 170]
    assert mask.lists.kv_counts.sum(dim=(0, 1, 2)).tolist() == [170, 170]  # the forward's partial, full lists


def test_explain_shows_block_density_and_mask_mod_cost() -> None:
    q, k, v = _qkv()
    mask = BlockMask.from_mask_mod(mod_examples.prefix_lm, batch=None, heads=None, seqlen_q=S, seqlen_k=S,
                                   block_size=(16, 16))  # fmt: skip
    text = str(flash.explain(q, k, v, block_mask=mask))
    assert f"block density {mask.density:.1%} of 16x16 blocks" in text
    assert "mask_mod on every tile" in str(flash.explain(q, k, v, mask_mod=mod_examples.prefix_lm))
    documents = BlockMask.from_document_ids(torch.arange(S) // 10, block_size=(16, 16))
    assert "every query sees one interval of keys" in str(flash.explain(q, k, v, block_mask=documents))
    split = BlockMask.from_document_ids(torch.arange(S) % 3, block_size=(16, 16))  # documents that are no runs
    assert "partial blocks compare document ids" in str(flash.explain(q, k, v, block_mask=split))
    padding = torch.ones(B, 1, 1, S, dtype=torch.bool)
    assert "key-padding mask" in str(flash.explain(q, k, v, attn_mask=padding))
    assert "key-padding mask" not in str(flash.explain(q, k, v, attn_mask=padding.expand(B, 1, S, S)))


# ----------------------------------------------------------------------------- plans


def test_plans_are_keyed_by_mask_layout_never_by_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "_plans", plan.BoundedCache(16))
    q, k, v = _qkv()
    for seed in range(3):
        mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(seed)) > 0.5
        flash.attention(q, k, v, attn_mask=mask, alibi_slopes=torch.rand(H), score_mod=mod_examples.softcap)
    assert len(plan._plans) == 1
    flash.attention(q, k, v, attn_mask=torch.ones(1, 1, S, S, dtype=torch.bool))  # another broadcast shape
    flash.attention(q, k, v, attn_mask=torch.ones(1, 1, S, S, dtype=torch.bool), mask_mod=mod_examples.prefix_lm)
    assert len(plan._plans) == 3


# ----------------------------------------------------------------------------- gradients


def test_additive_mask_gradient_matches_the_oracle() -> None:
    q, k, v = _qkv(requires_grad=True)
    bias = torch.randn(1, H, S, S, dtype=torch.float64, requires_grad=True)
    out = flash.attention(q, k, v, attn_mask=bias, causal=True, score_mod=mod_examples.relative_bias,
                          score_mod_grad=mod_examples.additive_grad)  # fmt: skip
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    spec = flash.build_spec(q, k, v, attn_mask=bias, causal=True, score_mod=mod_examples.relative_bias)
    masks = CallMasks(attn_mask=bias, score_mod=mod_examples.relative_bias).tensors()
    want = torch.autograd.grad(dense_attention(spec, q, k, v, masks=masks)[0], (q, k, v, bias), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_score_mod_without_derivative_trains_through_autograd_in_the_reference() -> None:
    q, k, v = _qkv(requires_grad=True)
    out = flash.attention(q, k, v, score_mod=mod_examples.softcap, backend="reference")
    got = torch.autograd.grad(out.sum(), (q, k))
    ref = flash.attention(q, k, v, score_mod=mod_examples.softcap, score_mod_grad=mod_examples.softcap_grad)
    want = torch.autograd.grad(ref.sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_mods_run_on_torch_tensors() -> None:
    x = torch.tensor([-2.0, 0.5])
    assert torch.equal(mods.where(x > 0, x, 0.0), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(mods.sigmoid(x), torch.sigmoid(x))
    assert torch.equal(mods.maximum(x, 0.0), torch.tensor([0.0, 0.5]))
    assert set(mods.names()) == set(mods.__all__)


# ----------------------------------------------------------------------------- PyTorch drop-ins


def test_sdpa_masks_run_on_flash_not_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from flash import api

    monkeypatch.setattr(api, "_torch_sdpa", None)  # any fallback to PyTorch would fail
    q, k, v = (t.transpose(1, 2) for t in _qkv())  # (batch, heads, seqlen, dim)
    masks = [
        torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(2)) > 0.3,
        torch.randn(H, S, S, dtype=torch.float64),
        torch.arange(S)[None, None, None, :] < torch.tensor([S, 9])[:, None, None, None],  # padding
    ]
    for mask in masks:
        got = flash.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    for q_len in (10, S):  # fewer queries than keys: PyTorch's top-left causal mask as a mask function
        causal = flash.scaled_dot_product_attention(q[:, :, :q_len], k, v, is_causal=True)
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, :q_len], k, v, is_causal=True)
        torch.testing.assert_close(causal, want)


def test_multihead_attention_masks_match_torch() -> None:
    torch.manual_seed(0)
    ours = flash.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    padding = torch.arange(10)[None, :] >= torch.tensor([10, 6])[:, None]  # True: padded (torch's convention)
    causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    for kwargs in ({"key_padding_mask": padding}, {"attn_mask": causal, "key_padding_mask": padding}):
        got, _ = ours(x, x, x, **kwargs)
        want, _ = theirs(x, x, x, need_weights=False, **kwargs)
        torch.testing.assert_close(got, want)


def test_block_sparse_is_a_block_mask_without_partial_blocks() -> None:
    """A block-aligned pattern reports "block_sparse" (info.partial False) at odd sizes too, whose tail blocks
    are partial only past the sequences' ends; its lists still hold those tails as partial blocks. Blocks
    coarser than the pattern give partial blocks ("block_mask"); where every query also sees one interval of
    keys (block-causal), "key_intervals" wins."""
    from flash.testing.mod_examples import block_pattern

    def make(mod: object, s: int, block_size: tuple[int, int]) -> BlockMask:
        return BlockMask.from_mask_mod(mod, batch=None, heads=None, seqlen_q=s, seqlen_k=s,  # type: ignore[arg-type]
                                       block_size=block_size)  # fmt: skip

    for s in (512, 300):
        for block_size in ((128, 128), (64, 32)):
            sparse = make(block_pattern, s, block_size)
            assert not sparse.info.partial and sparse.info.feature == "block_sparse", (s, block_size)
            assert bool((sparse.lists.kv_counts[..., 0] > 0).any()) == (s % 128 != 0)  # the tails only
            dense = block_pattern(None, None, torch.arange(s)[:, None], torch.arange(s)[None, :])
            assert BlockMask.from_dense(dense, block_size=block_size).info.feature == "block_sparse"
    assert make(block_pattern, 300, (256, 128)).info.feature == "block_mask"
    block_causal = make(lambda b, h, q, kv: kv // 128 <= q // 128, 300, (128, 128))
    assert not block_causal.info.partial and block_causal.info.feature == "key_intervals"
    q, k, v = _qkv(seqlen=300)
    text = str(flash.explain(q, k, v, block_mask=make(block_pattern, 300, (128, 128))))
    assert "block_sparse" in text and "no partial blocks" in text


def test_made_once_keeps_each_summary_of_a_mask_until_it_changes() -> None:
    """flash.masking.made_once: two summaries of one mask (a forward's runs, a backward's tables) are each
    made once and kept side by side; an in-place change of the mask makes them again."""
    from flash import masking

    calls: list[str] = []

    def runs(mask: torch.Tensor, n: int) -> torch.Tensor:
        calls.append("runs")
        return mask.sum() + n

    def tables(mask: torch.Tensor, n: int) -> torch.Tensor:
        calls.append("tables")
        return mask.sum() * n

    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    for _ in range(3):  # layers alternating forward and backward
        assert int(masking.made_once(runs, mask, 8)) == 24 and int(masking.made_once(tables, mask, 8)) == 128
    assert calls == ["runs", "tables"]
    mask[0, ..., 0] = False
    assert int(masking.made_once(runs, mask, 8)) == 23 and calls == ["runs", "tables", "runs"]
