"""Hopper backward (flash_cuda.hopper_bwd), packed (varlen) batches, CPU tier: replays of the kernels'
index arithmetic in float64 numpy (no GPU, no NVRTC).

The replay mirrors, line for line, what the three launches do with a packed batch: the rows pass
(a buffer row's packed row by packed_row's binary search: kernels/hopper_bwd_packed.cuh), the main
kernel (Block::set with locate, the unmasked query blocks free_lo..free_hi, TMA tiles read at the
sequence's offset, so past a sequence's end they hold the NEXT sequence's rows, never zeros; dQ tiles
at Block::buffer_row) and the dQ pass. Its gradients must equal float64 autograd of dense attention
per sequence, so the layout the three agree on, the per-sequence masks and the claim that rows read
past a sequence's end contribute exact zeros are checked without a device.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

hopper_bwd = pytest.importorskip("flash_cuda.hopper_bwd")

from flash_cuda import hopper, hopper_tiles  # noqa: E402

BM, BN = hopper_bwd.BLOCK_M, hopper_bwd.BLOCK_N
LOG2E = hopper.LOG2E


# ------------------------------------------------------------------ hopper_bwd_packed.cuh


def sequence(cu: list[int], b: int, total: int, max_len: int) -> tuple[int, int]:
    start = min(max(cu[b], 0), total)
    return start, min(min(max(cu[b + 1], start), total) - start, max_len)


def first_block(start: int, b: int) -> int:
    return start // BM + b


def packed_row(cu: list[int], batch: int, total: int, max_len: int, row: int) -> int:
    block = row // BM
    lo, hi = 0, batch - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if first_block(min(max(cu[mid], 0), total), mid) <= block:
            lo = mid
        else:
            hi = mid - 1
    start, length = sequence(cu, lo, total, max_len)
    r = row - first_block(start, lo) * BM
    return start + r if 0 <= r < length else -1


def offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


# ------------------------------------------------------------------ the layout


@pytest.mark.parametrize("seed", range(40))
def test_packed_layout_is_a_bijection_inside_the_buffers(seed):
    """Consistent offsets (empty sequences included): every (sequence, row) has its own buffer row,
    below packed_rows, on the sequence's own whole blocks, and packed_row gives it back; every other
    buffer row is padding."""
    rng = random.Random(seed)
    batch = rng.randint(1, 12)
    lengths = [rng.choice([0, 1, 63, 64, 65, rng.randint(0, 300)]) for _ in range(batch)]
    cu, total = offsets(lengths), sum(lengths)
    s_pad = hopper_bwd.packed_rows(total, batch)
    owner = {}
    for b, length in enumerate(lengths):
        start, _ = sequence(cu, b, total, max(lengths))
        base = first_block(start, b) * BM
        for r in range(-(-length // BM) * BM):  # the sequence's whole blocks
            assert base + r < s_pad and base + r not in owner, (lengths, b, r)
            owner[base + r] = start + r if r < length else -1
    for row in range(s_pad):
        assert packed_row(cu, batch, total, max(lengths), row) == owner.get(row, -1), (lengths, row)


@pytest.mark.parametrize("seed", range(40))
def test_inconsistent_offsets_never_address_outside(seed):
    """Garbage offsets (negative, decreasing, past the tokens) and a longest length that is too small:
    every sequence stays inside the packed tensor and its blocks inside the buffers, every buffer row
    maps to a packed row or to padding."""
    rng = random.Random(seed)
    batch, total = rng.randint(1, 9), rng.randint(1, 500)
    cu = [rng.randint(-100, total + 100) for _ in range(batch + 1)]
    max_len = rng.randint(1, 400)
    s_pad = hopper_bwd.packed_rows(total, batch)
    for b in range(batch):
        start, length = sequence(cu, b, total, max_len)
        assert min(start, length) >= 0 and start + length <= total
        assert (first_block(start, b) + -(-length // BM)) * BM <= s_pad
    for row in range(s_pad):
        assert -1 <= packed_row(cu, batch, total, max_len, row) < total


# ------------------------------------------------------------------ the three launches


def block_work(n0: int, len_q: int, len_k: int, mask: int, left: int, right: int) -> tuple[int, int, int, int]:
    """Block::set: (m_lo, m_hi, free_lo, free_hi) of the key block at n0 of one sequence."""
    off = len_k - len_q
    q_lo, q_hi = 0, len_q
    if mask >= 1:
        q_lo = max(0, n0 - off - right)
    if mask == 2:
        q_hi = min(q_hi, min(n0 + BN, len_k) - 1 - off + left + 1)
    m_lo = m_hi = 0
    if q_hi > q_lo:
        m_lo, m_hi = q_lo // BM, -(-q_hi // BM)
    lo, hi = 0, 1 << 30
    if mask >= 1:
        lo = -((-(n0 + BN - 1 - off - right)) // BM)  # ceil_div
    if mask == 2:
        hi = (n0 - off + left - BM + 1) // BM + 1  # floor_div + 1
    if n0 + BN > len_k:
        lo = hi
    return m_lo, m_hi, max(-1, min(lo, 1 << 30)), max(-1, min(hi, 1 << 30))


def rows_of(t: np.ndarray, start: int, n: int) -> np.ndarray:
    """A TMA box of n rows at `start` of a packed (tokens, d) tensor: zeros only past its end."""
    box = np.zeros((n, t.shape[1]))
    take = t[start : start + n]
    box[: len(take)] = take
    return box


def replay(q, k, v, out, lse, dout, cu_q, cu_k, max_q, max_k, heads_kv, window, scale):
    """dQ, dK, dV of a packed batch ((tokens, heads, d) float64 arrays, lse (heads, tokens)) the way
    the rows pass, the main kernel and the dQ pass compute them (NaN where nothing is written)."""
    total_q, heads_q, d = q.shape
    total_k = k.shape[0]
    batch, group = len(cu_q) - 1, heads_q // heads_kv
    mask = hopper_tiles.mask_kind(window)
    left, right = hopper._reach(window[0]), hopper._reach(window[1])
    s_pad = hopper_bwd.packed_rows(total_q, batch)
    # rows pass
    lse2, delta = np.full((heads_q, s_pad), np.inf), np.zeros((heads_q, s_pad))
    for h, row in itertools.product(range(heads_q), range(s_pad)):
        token = packed_row(cu_q, batch, total_q, max_q, row)
        if token >= 0:
            delta[h, row] = out[token, h] @ dout[token, h]
            lse2[h, row] = np.inf if lse[h, token] == -np.inf else lse[h, token] * LOG2E
    # main kernel
    dq_acc = np.zeros((heads_q, s_pad, d))
    dq, dk, dv = np.full(q.shape, np.nan), np.full(k.shape, np.nan), np.full(v.shape, np.nan)
    for b, kv_head, n0 in itertools.product(range(batch), range(heads_kv), range(0, max_k, BN)):
        q_start, len_q = sequence(cu_q, b, total_q, max_q)
        k_start, len_k = sequence(cu_k, b, total_k, max_k)
        if n0 >= len_k:
            continue  # has_keys(): the block exits
        m_lo, m_hi, free_lo, free_hi = block_work(n0, len_q, len_k, mask, left, right)
        q_block0 = first_block(q_start, b)
        kt, vt = rows_of(k[:, kv_head], k_start + n0, BN), rows_of(v[:, kv_head], k_start + n0, BN)
        dk_acc, dv_acc = np.zeros((BN, d)), np.zeros((BN, d))
        for head, m in itertools.product(range(kv_head * group, (kv_head + 1) * group), range(m_lo, m_hi)):
            qt, dot = rows_of(q[:, head], q_start + m * BM, BM), rows_of(dout[:, head], q_start + m * BM, BM)
            rows = q_block0 * BM + m * BM  # Block::buffer_row + m0 (batch coordinate 0)
            st = kt @ qt.T  # (keys, queries)
            if m < free_lo or m >= free_hi:  # mask_transposed
                j = n0 + np.arange(BN)[:, None]
                i = m * BM + np.arange(BM)[None, :]
                visible = (j < len_k) & (i >= 0)  # (keys, queries)
                if mask >= 1:
                    visible &= j - i - (len_k - len_q) <= right
                if mask == 2:
                    visible &= j - i - (len_k - len_q) >= -left
                st = np.where(visible, st, -np.inf)
            with np.errstate(invalid="raise"):  # an inf * 0 would be a NaN the kernel makes too
                pt = np.exp2(st * scale * LOG2E - lse2[head, rows : rows + BM][None, :])
                dst = pt * (vt @ dot.T - delta[head, rows : rows + BM][None, :])
            dv_acc += pt @ dot
            dk_acc += dst @ qt
            dq_acc[head, rows : rows + BM] += dst.T @ kt
        keys = min(BN, len_k - n0)  # store_rows: keys below len_k
        dk[k_start + n0 : k_start + n0 + keys, kv_head] = dk_acc[:keys] * scale
        dv[k_start + n0 : k_start + n0 + keys, kv_head] = dv_acc[:keys]
    # dQ pass
    for h, row in itertools.product(range(heads_q), range(s_pad)):
        token = packed_row(cu_q, batch, total_q, max_q, row)
        if token >= 0:
            dq[token, h] = dq_acc[h, row] * scale
    return dq, dk, dv


def oracle(q, k, v, dout, cu_q, cu_k, heads_kv, window, scale):
    """Float64 autograd of dense attention, sequence by sequence (flash.masking: bottom-right aligned);
    also each row's LSE and output, as any forward gives them."""
    import torch

    group = q.shape[1] // heads_kv
    grads = [np.zeros_like(t) for t in (q, k, v)]
    out, lse = np.zeros_like(q), np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        (qa, qb), (ka, kb) = cu_q[b : b + 2], cu_k[b : b + 2]
        if qb == qa or kb == ka:
            continue  # no scores: output 0, LSE -inf, gradients 0
        tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q[qa:qb], k[ka:kb], v[ka:kb]))
        s = torch.einsum("qhd,khd->hqk", tq, tk.repeat_interleave(group, 1)) * scale
        i, j = torch.arange(qb - qa)[:, None], torch.arange(kb - ka)[None, :]
        diag = j - i - (kb - ka - (qb - qa))
        seen = torch.ones_like(diag, dtype=torch.bool)
        if window[1] >= 0:
            seen &= diag <= window[1]
        if window[0] >= 0:
            seen &= diag >= -window[0]
        s = s.masked_fill(~seen, -math.inf)
        row_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None]).nan_to_num(0.0)
        o = torch.einsum("hqk,khd->qhd", p, tv.repeat_interleave(group, 1))
        for grad, got in zip(grads, torch.autograd.grad(o, (tq, tk, tv), torch.tensor(dout[qa:qb]))):
            grad[(qa if grad is grads[0] else ka) : (qb if grad is grads[0] else kb)] = got.numpy()
        out[qa:qb], lse[:, qa:qb] = o.detach().numpy(), row_lse.detach().numpy()
    return out, lse, grads


CASES = [
    # lengths_q, lengths_k, heads_q, heads_kv, window
    ([70, 0, 130, 1, 64], [90, 0, 60, 129, 200], 2, 2, (-1, -1)),
    ([70, 0, 130, 1, 64], [90, 0, 60, 129, 200], 2, 1, (-1, 0)),
    ([200, 3, 0, 65], [100, 300, 17, 65], 4, 2, (-1, 0)),  # causal: rows without keys (len_q > len_k)
    ([150, 40, 129], [260, 40, 5], 2, 2, (40, 7)),
    ([100, 0, 0, 90], [130, 50, 0, 90], 3, 1, (-1, 20)),
    ([128, 64, 1], [128, 256, 0], 2, 2, (16, -1)),  # queries without keys: dQ 0
]


@pytest.mark.parametrize("lengths_q, lengths_k, heads_q, heads_kv, window", CASES)
def test_replay_of_the_packed_backward_matches_the_oracle(lengths_q, lengths_k, heads_q, heads_kv, window):
    rng = np.random.default_rng(sum(lengths_q) + heads_q)
    d, scale = 16, 0.3
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    q = rng.standard_normal((cu_q[-1], heads_q, d))
    k, v = (rng.standard_normal((cu_k[-1], heads_kv, d)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    out, lse, exact = oracle(q, k, v, dout, cu_q, cu_k, heads_kv, window, scale)
    got = replay(q, k, v, out, lse, dout, cu_q, cu_k, max(lengths_q), max(lengths_k), heads_kv, window, scale)
    for name, g, e in zip(("dq", "dk", "dv"), got, exact):
        assert not np.isnan(g).any(), f"{name}: a token left unwritten"
        assert np.abs(g - e).max() < 1e-9, (name, np.abs(g - e).max())
