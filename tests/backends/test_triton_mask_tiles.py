"""Which tiles the Triton kernels visit under a mask, counted in Triton's CPU interpreter.

A spy replaces the kernels' tile functions (the interpreter runs them as Python) and records every
tile a walk visits: the fixed block, the walked block and whether it was masked. So the claims on
how much work a mask costs are checked here without a GPU: a key-padding mask visits no key block
that holds only padding and masks only the blocks it cuts, in the forward and both backward walks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import flash

pytest.importorskip("triton")

from test_triton_kernels import BWD, FWD, use_config  # tests/backends is on the path (rootdir-less module)

from flash_triton import runtime

pytestmark = pytest.mark.skipif(
    not runtime.interpreting() or runtime.mode_mismatch() is not None,
    reason="CPU tier: needs TRITON_INTERPRET=1 set before Python starts (as nox sets it without a GPU)",
)

BLOCK = 16  # every tile edge below: the walked blocks are 16 keys or 16 queries


def _int(x: Any) -> int:
    """A scalar of the interpreter (a tensor wrapping an array) or a plain int, as an int; a vector's first entry."""
    return int(x.handle.data.flatten()[0]) if hasattr(x, "handle") else int(x)


@contextmanager
def tile_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int, int, bool, bool]]]:
    """Records ``(pass, sequence, fixed block start, walked block start, masked, pass flag)`` of every
    visited tile of query head 0 (the others walk the same tiles); the pass flag is the forward's guard
    against non-finite values."""
    kernels = runtime.kernels()
    log: list[tuple[str, int, int, int, bool, bool]] = []

    def spy(module: Any, name: str, seq_at: int, fixed_at: int) -> None:
        real = getattr(module, name).fn

        def tile(carry, start, ctx, masked, *rest):  # type: ignore[no-untyped-def]
            if _int(ctx[seq_at][1]) == 0:
                flag = bool(rest[-1])
                log.append((name, _int(ctx[seq_at][0]), _int(ctx[fixed_at]), _int(start), bool(masked), flag))
            return real(carry, start, ctx, masked, *rest)

        monkeypatch.setattr(module, name, tile)

    spy(kernels.forward, "forward_tile", 4, 3)  # ctx = (q, k, v, rows, seq, ...)
    spy(kernels.backward, "dq_tile", 7, 6)  # ctx = (q, do, lse2, delta, k, v, rows, seq, ...)
    spy(kernels.backward, "dkdv_tile", 6, 5)  # ctx = (k, v, q, do, stats, cols, seq, ...)
    yield log


def _run(mask: torch.Tensor, seqlen: int, **options: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(mask.shape[0], seqlen, 2, 32, generator=gen, dtype=torch.float16).requires_grad_()
               for _ in range(3))  # fmt: skip
    out = flash.attention(q, k, v, attn_mask=mask, backend="triton", **options)
    torch.autograd.grad(out.float().sum(), (q, k, v))


@pytest.fixture
def square_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    use_config(monkeypatch, {**FWD, "block_m": BLOCK, "block_n": BLOCK},
               {**BWD, "block_m": BLOCK, "block_n": BLOCK, "dq_block_m": BLOCK, "dq_block_n": BLOCK})  # fmt: skip


@pytest.mark.usefixtures("square_tiles")
def test_key_padding_visits_no_padded_key_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Right padding, lengths 37, 64 and 5 of 64 keys: each walk visits exactly the key blocks that hold
    a real key and masks only the one a length cuts, as the variable-length path would."""
    lengths = torch.tensor([37, 64, 5])
    mask = (torch.arange(64) < lengths[:, None])[:, None, None, :]
    with tile_log(monkeypatch) as log:
        _run(mask, 64)
    for name in ("forward_tile", "dq_tile", "dkdv_tile"):
        for b, length in enumerate(lengths.tolist()):
            tiles = [(fixed, walked, masked) for n, s, fixed, walked, masked, _ in log if (n, s) == (name, b)]
            if name == "dkdv_tile":  # keys fixed, the 4 query blocks walked
                want = [(key, query, length % BLOCK > 0 and key == length // BLOCK * BLOCK)
                        for key in range(0, length, BLOCK) for query in range(0, 64, BLOCK)]  # fmt: skip
            else:  # queries fixed, keys walked
                want = [(query, key, key + BLOCK > length)
                        for query in range(0, 64, BLOCK) for key in range(0, length, BLOCK)]  # fmt: skip
            assert sorted(tiles) == sorted(want), (name, b)
    # 4 query blocks x (3 + 4 + 1) key blocks of head 0 in each walk, of the 4 x 4 x 3 a dense walk visits
    assert [sum(n == name for n, *_ in log) for name in ("forward_tile", "dq_tile", "dkdv_tile")] == [32, 32, 32]


@pytest.mark.usefixtures("square_tiles")
def test_key_padding_with_holes_walks_only_between_its_first_and_last_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys 20..50 with a hole at 30: blocks 16..63 are walked, all masked (the run is not contiguous);
    with causal too, the causal walk is clipped to the same keys."""
    mask = ((torch.arange(64) >= 20) & (torch.arange(64) <= 50) & (torch.arange(64) != 30))[None, None, None, :]
    with tile_log(monkeypatch) as log:
        _run(mask, 64)
        forward = {(fixed, walked, masked) for n, _, fixed, walked, masked, _ in log if n == "forward_tile"}
        assert forward == {(query, key, True) for query in range(0, 64, BLOCK) for key in (16, 32, 48)}
        assert {fixed for n, _, fixed, *_ in log if n == "dkdv_tile"} == {16, 32, 48}
        log.clear()
        _run(mask, 64, causal=True)
        forward = {(fixed, walked) for n, _, fixed, walked, *_ in log if n == "forward_tile"}
        assert forward == {(query, key) for query in range(0, 64, BLOCK) for key in (16, 32, 48) if key <= query}


@pytest.mark.usefixtures("square_tiles")
def test_document_mask_guards_masked_tiles_only_when_v_holds_a_non_finite_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Documents of 10 tokens in 16 x 16 blocks (partial blocks are most): with finite values the
    forward checks V once and skips the per-tile guard; a NaN in V puts the guard back, and it reaches
    exactly the rows that see its key, as in the reference."""
    mask = flash.BlockMask.from_document_ids(torch.arange(64) // 10, block_size=(BLOCK, BLOCK))
    assert mask.partial_share > 0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=gen, dtype=torch.float16) for _ in range(3))
    poisoned = v.clone()
    poisoned[0, 25, 0, 3] = float("nan")  # document 2 (keys 20..29): rows 25..29 see it
    with tile_log(monkeypatch) as log:
        for values, guarded in ((v, False), (poisoned, True)):
            log.clear()
            got = flash.attention(q, k, values, block_mask=mask, backend="triton")
            want = flash.attention(q, k, values, block_mask=mask, backend="reference")
            masked = [flag for n, _, _, _, is_masked, flag in log if n == "forward_tile" and is_masked]
            assert masked and all(flag == guarded for flag in masked)
            assert torch.equal(got.isnan(), want.isnan())
            torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], atol=2e-3, rtol=0)
    assert int(got.isnan().sum()) == 5


def test_a_padding_mask_is_summarised_once_until_changed_in_place() -> None:
    """The layers of a model (and the backward) share one padding mask: its key runs are made once; an
    in-place change of the mask makes them again, and the results follow the mask."""
    from flash import masking

    mask = (torch.arange(64) < 40)[None, None, None, :].clone()
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16) for _ in range(3))
    flash.attention(q, k, v, attn_mask=mask, backend="triton")
    first = masking._made[mask][masking.key_runs, (64,)][1]
    assert first.tolist() == [[0, 40, 0, 40]]
    flash.attention(q, k, v, attn_mask=mask, backend="triton")
    assert masking._made[mask][masking.key_runs, (64,)][1] is first
    mask[..., 50:] = True  # keys 0..39 and 50..63: not one run any more
    got = flash.attention(q, k, v, attn_mask=mask, backend="triton")
    assert masking._made[mask][masking.key_runs, (64,)][1].tolist() == [[0, 64, 0, 0]]
    want = flash.attention(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
