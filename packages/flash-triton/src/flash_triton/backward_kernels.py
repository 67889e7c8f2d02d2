"""The backward kernels: recomputation from the saved LSE, P is never stored.

Three launches:

* :func:`attention_backward_preprocess_kernel`: ``delta = rowsum(dO * O)`` and the LSE moved to
  the log2 domain (``lse * log2(e)``, with ``-inf`` turned into ``+inf`` so that a row that saw no
  key recomputes ``P = exp2(s - inf) = 0`` instead of NaN).
* :func:`attention_backward_dkdv_kernel` (K/V-stationary): one program owns ``BLOCK_N`` keys of
  one K/V head and walks, for every query head of its GQA group in a fixed order, the query
  blocks that can see those keys (:func:`dkdv_tile`); dK and dV accumulate in registers and are
  written once. With an additive mask that requires grad it also writes each tile's dS (the
  mask's gradient, before core sums it over broadcast axes).
* :func:`attention_backward_dq_kernel` (Q-stationary): one program owns ``BLOCK_M`` query rows
  and walks their key blocks like the forward (:func:`dq_tile`); no atomics anywhere, so
  gradients are bit-identical run to run.

Both walks are :func:`flash_triton.tiles.walk`, and both tiles recompute P and dS with
:func:`p_and_ds`, whose scores come from :func:`flash_triton.tiles.score_tile`: one definition
of a tile's terms and masks for the forward and the two backward kernels.

Per tile, with ``s`` the scores with all their terms in the log2 domain::

    P  = exp2(s - lse2)           dV += P^T dO
    dP = dO V^T                   dS  = P * (dP - delta)   (* score_mod', * (1 - tanh^2) with softcap)
    dK += dS^T Q                  dQ += dS K               (both times the softmax scale)

Dropout (optional) multiplies P and dP by the kept elements' ``1 / (1 - p)``, recomputing the same
hash as the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.forward_kernel import load_block, load_rows
from flash_triton.runtime import interpreting
from flash_triton.tiles import (
    LOG2E,
    block_list,
    block_range,
    clip_to_key_runs,
    dropout_keep,
    dropout_row_hash,
    head_terms,
    key_block_runs,
    score_tile,
    sequence_bounds,
    walk,
)

INTERPRETED = interpreting()


@triton.jit
def attention_backward_preprocess_kernel(
    Out,
    DO,
    Lse,
    Delta,
    Lse2,
    CuQ,
    sob,
    sos,
    soh,
    sdob,
    sdos,
    sdoh,
    slb,
    slh,
    sls,
    sbb,
    sbh,
    sbs,
    seqlen_q,
    total_q,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Grid: (query blocks, heads_q, batch). ``Delta``/``Lse2`` share the strides ``sb*``."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, _, _ = sequence_bounds(b, CuQ, CuQ, seqlen_q, seqlen_q, total_q, total_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows_ok = m0 + offs_m < len_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row64 = (q_start + m0).to(tl.int64)
    o = load_rows(Out + b64 * sob + h64 * soh + row64 * sos + offs_m[:, None] * sos + offs_d[None, :],
                  rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    do = load_rows(DO + b64 * sdob + h64 * sdoh + row64 * sdos + offs_m[:, None] * sdos + offs_d[None, :],
                   rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + b64 * slb + h64 * slh + row64 * sls + offs_m * sls, mask=rows_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    buf = b64 * sbb + h64 * sbh + row64 * sbs + offs_m * sbs
    tl.store(Delta + buf, delta, mask=rows_ok)
    tl.store(Lse2 + buf, lse2, mask=rows_ok)


@triton.jit
def p_and_ds(
    qk, dp, rows, cols, lse2, delta, seq, win, terms, drop,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    TERMS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr,
):  # fmt: skip
    """The one recomputation of a backward tile: ``(P for dV, dS, dS before softcap)``.

    ``qk`` and ``dp = dO V^T`` are tiles in either orientation; ``rows``, ``cols``, ``lse2`` and
    ``delta`` are broadcast to it. P for dV carries dropout's keep mask and scale; dS is the
    gradient of the raw scores (``* scale`` left to the caller); dS before softcap is the gradient
    of the scores after the additive mask and ``score_mod`` (an additive mask's gradient).
    ``drop = (head_hash, threshold, scale)``.
    """
    s, _, d_mod, d_cap = score_tile(qk, rows, cols, seq, win, terms, MASKED, True, HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP,
                                    ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD)  # fmt: skip
    p = tl.math.exp2(s - lse2) if TERMS else tl.math.exp2(s * terms[0] - lse2)
    p_dv = p
    if DROPOUT:
        keep = dropout_keep(drop[0], rows, cols, drop[1])
        p_dv = tl.where(keep, p * drop[2], 0.0)
        dp = tl.where(keep, dp * drop[2], 0.0)
    ds = p * (dp - delta)
    if SCORE_MOD is not None:
        ds = ds * d_mod
    ds_bias = ds
    if SOFTCAP:
        ds = ds * d_cap
    return p_dv, ds, ds_bias


@triton.jit
def dkdv_tile(
    carry, start_m, ctx,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TMA: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TERMS: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, BIAS_GRAD: tl.constexpr,
):  # fmt: skip
    """Fold the query block at ``start_m`` into ``carry = (dK, dV)`` of the program's keys.

    ``ctx = (k, v, q_src, do_src, stats, cols, seq, win, terms, drop, dbias)`` with ``stats = (lse2
    pointer, delta pointer, stride)`` and ``dbias = (pointer, query stride, key stride)`` of this head.
    Tiles are (keys, queries): K and V stay the left-hand operands.
    """
    dk, dv = carry
    k, v, q_src, do_src, stats, cols, seq, win, terms, drop, dbias = ctx
    len_q = seq[2]
    rows = start_m + tl.arange(0, BLOCK_M)
    q = load_block(q_src, start_m, len_q, BLOCK_M, HEAD_DIM, D_PAD, MASKED, TMA)
    do = load_block(do_src, start_m, len_q, BLOCK_M, HEAD_DIM, D_PAD, MASKED, TMA)
    if MASKED:
        lse2 = tl.load(stats[0] + rows * stats[2], mask=rows < len_q, other=float("inf"))
        delta = tl.load(stats[1] + rows * stats[2], mask=rows < len_q, other=0.0)
    else:
        lse2 = tl.load(stats[0] + rows * stats[2])
        delta = tl.load(stats[1] + rows * stats[2])
    p_t, ds_t, dsb_t = p_and_ds(tl.dot(k, tl.trans(q)), tl.dot(v, tl.trans(do)), rows[None, :], cols[:, None],
                                lse2[None, :], delta[None, :], seq, win, terms, drop, MASKED, DROPOUT, HAS_LEFT,
                                HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD,
                                MASK_MOD)  # fmt: skip
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    if BIAS_GRAD:
        inside = (rows[None, :] < len_q) & (cols[:, None] < seq[3])
        tl.store(dbias[0] + rows[None, :] * dbias[1] + cols[:, None] * dbias[2], dsb_t, mask=inside)
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def dq_tile(
    carry, start_n, ctx,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TMA: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TERMS: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, BIAS_GRAD: tl.constexpr,
):  # fmt: skip
    """Fold the key block at ``start_n`` into ``carry = (dQ,)`` of the program's query rows.

    ``ctx = (q, do, lse2, delta, k_src, v_src, rows, seq, win, terms, drop)``.
    """
    (dq,) = carry
    q, do, lse2, delta, k_src, v_src, rows, seq, win, terms, drop = ctx
    len_k = seq[3]
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_block(k_src, start_n, len_k, BLOCK_N, HEAD_DIM, D_PAD, MASKED, TMA)
    v = load_block(v_src, start_n, len_k, BLOCK_N, HEAD_DIM, D_PAD, MASKED, TMA)
    _, ds, _ = p_and_ds(tl.dot(q, tl.trans(k)), tl.dot(do, tl.trans(v)), rows[:, None], cols[None, :],
                        lse2[:, None], delta[:, None], seq, win, terms, drop, MASKED, DROPOUT, HAS_LEFT, HAS_RIGHT,
                        TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD)  # fmt: skip
    return (tl.dot(ds.to(k.dtype), k, dq),)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, DBias, Lse2, Delta, CuQ, CuK, q_desc, do_desc, Mask, Alibi, Counts, Indices, Runs,
    q_str, k_str, v_str, do_str, dk_str, dv_str, db_str, l_str, m_str, a_str, c_str, i_str, r_str,
    seqlen_q, seqlen_k, total_q, total_k, group, q_map, do_map,
    scale, scale_log2, softcap_scale, softcap_log2, left, right, seed_lo, seed_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, TMA: tl.constexpr, TERMS: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE: tl.constexpr,
    SPARSE_FIXED: tl.constexpr, SPARSE_WALK: tl.constexpr, ELEMENTWISE: tl.constexpr, KEY_RUNS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
):  # fmt: skip
    """Grid: (key blocks, heads_kv, batch). ``Lse2``/``Delta`` share the strides ``l_str``; ``DBias`` is
    (batch, heads_q, seqlen_q, seqlen_k) with strides ``db_str``. Other strides as the forward's."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = sequence_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    offset = len_k - len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    cols = n0 + offs_n
    cols_ok = cols < len_k

    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    key64 = (k_start + n0).to(tl.int64)
    zero64 = b64 * 0
    q_start64 = zero64 + q_start
    k_ptrs = K + b64 * k_str[0] + hk64 * k_str[2] + (key64 + offs_n[:, None]) * k_str[1] + offs_d[None, :]
    v_ptrs = V + b64 * v_str[0] + hk64 * v_str[2] + (key64 + offs_n[:, None]) * v_str[1] + offs_d[None, :]
    k = load_rows(k_ptrs, cols_ok, d_ok, HEAD_DIM, D_PAD, True)
    v = load_rows(v_ptrs, cols_ok, d_ok, HEAD_DIM, D_PAD, True)
    carry = (tl.zeros([BLOCK_N, D_PAD], tl.float32), tl.zeros([BLOCK_N, D_PAD], tl.float32))

    # Keys fixed, query blocks walked: the mask seen from the keys (offset negated, reaches swapped).
    bounds = block_range(n0, tl.minimum(n0 + BLOCK_N, len_k) - 1, len_q, -offset, right, left, HAS_RIGHT, HAS_LEFT,
                         BLOCK_M)  # fmt: skip
    if KEY_RUNS:
        bounds = key_block_runs(bounds, Runs + b * r_str, n0, tl.minimum(n0 + BLOCK_N, len_k) - 1)
    win = (left, right)
    for g in range(group):
        h = hk * group + g
        h64 = h.to(tl.int64)
        q_src = (q_desc, Q + b64 * q_str[0] + h64 * q_str[2] + q_start64 * q_str[1],
                 b * q_map[0] + h * q_map[1] + q_start, h * q_map[2], q_str[1], zero64)  # fmt: skip
        do_src = (do_desc, DO + b64 * do_str[0] + h64 * do_str[2] + q_start64 * do_str[1],
                  b * do_map[0] + h * do_map[1] + q_start, h * do_map[2], do_str[1], zero64)  # fmt: skip
        l_off = b64 * l_str[0] + h64 * l_str[1] + q_start64 * l_str[2]
        stats = (Lse2 + l_off, Delta + l_off, l_str[2])
        head_hash = 0
        if DROPOUT:
            head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)
        terms = head_terms(Mask, Alibi, m_str, a_str, b, h, scale_log2, softcap_scale, softcap_log2, ALIBI)
        dbias = (DBias + b64 * db_str[0] + h64 * db_str[1], db_str[2], db_str[3])
        lists = (0, 0, Indices, Indices)
        if SPARSE:
            lists = block_list(Counts, Indices, b, h, n0 // SPARSE_FIXED, c_str, i_str)
        ctx = (k, v, q_src, do_src, stats, cols, (b, h, len_q, len_k, offset), win, terms,
               (head_hash, drop_threshold, drop_scale), dbias)  # fmt: skip
        carry = walk(dkdv_tile, carry, ctx, bounds, lists, BLOCK_M, SPARSE_WALK, SPARSE, ELEMENTWISE, HEAD_DIM, D_PAD,
                     TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD,
                     MASK_MOD, BIAS_GRAD)  # fmt: skip

    dk, dv = carry
    dk = dk * scale
    mask = cols_ok[:, None] & d_ok[None, :]
    dk_ptrs = (
        DK + b64 * dk_str[0] + hk64 * dk_str[2] + key64 * dk_str[1] + offs_n[:, None] * dk_str[1] + offs_d[None, :]
    )
    dv_ptrs = (
        DV + b64 * dv_str[0] + hk64 * dv_str[2] + key64 * dv_str[1] + offs_n[:, None] * dv_str[1] + offs_d[None, :]
    )
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_backward_dq_kernel(
    Q, K, V, DO, DQ, Lse2, Delta, CuQ, CuK, k_desc, v_desc, Mask, Alibi, Counts, Indices, Runs,
    q_str, k_str, v_str, do_str, dq_str, l_str, m_str, a_str, c_str, i_str, r_str,
    seqlen_q, seqlen_k, total_q, total_k, group, k_map, v_map,
    scale, scale_log2, softcap_scale, softcap_log2, left, right, seed_lo, seed_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, TMA: tl.constexpr, REVERSE: tl.constexpr, TERMS: tl.constexpr, ALIBI: tl.constexpr,
    MASK: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr,
    SPARSE: tl.constexpr, SPARSE_FIXED: tl.constexpr, SPARSE_WALK: tl.constexpr, ELEMENTWISE: tl.constexpr,
    KEY_RUNS: tl.constexpr,
):  # fmt: skip
    """Grid: (query blocks, heads_q, batch)."""
    pid_m = tl.program_id(0)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    q_start, len_q, k_start, len_k = sequence_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    offset = len_k - len_q
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows = m0 + offs_m
    rows_ok = rows < len_q

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    row64 = (q_start + m0).to(tl.int64)
    zero64 = b64 * 0
    k_start64 = zero64 + k_start
    q = load_rows(Q + b64 * q_str[0] + h64 * q_str[2] + row64 * q_str[1] + offs_m[:, None] * q_str[1] + offs_d[None, :],
                  rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    do = load_rows(DO + b64 * do_str[0] + h64 * do_str[2] + row64 * do_str[1] + offs_m[:, None] * do_str[1]
                   + offs_d[None, :], rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    l_off = b64 * l_str[0] + h64 * l_str[1] + row64 * l_str[2] + offs_m * l_str[2]
    lse2 = tl.load(Lse2 + l_off, mask=rows_ok, other=float("inf"))
    delta = tl.load(Delta + l_off, mask=rows_ok, other=0.0)
    k_src = (k_desc, K + b64 * k_str[0] + hk64 * k_str[2] + k_start64 * k_str[1],
             b * k_map[0] + hk * k_map[1] + k_start, hk * k_map[2], k_str[1], zero64)  # fmt: skip
    v_src = (v_desc, V + b64 * v_str[0] + hk64 * v_str[2] + k_start64 * v_str[1],
             b * v_map[0] + hk * v_map[1] + k_start, hk * v_map[2], v_str[1], zero64)  # fmt: skip
    head_hash = 0
    if DROPOUT:
        head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)
    terms = head_terms(Mask, Alibi, m_str, a_str, b, h, scale_log2, softcap_scale, softcap_log2, ALIBI)
    lists = (0, 0, Indices, Indices)
    if SPARSE:
        lists = block_list(Counts, Indices, b, h, m0 // SPARSE_FIXED, c_str, i_str)

    bounds = block_range(m0, tl.minimum(m0 + BLOCK_M, len_q) - 1, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT,
                         BLOCK_N)  # fmt: skip
    if KEY_RUNS:
        bounds = clip_to_key_runs(bounds, Runs + b * r_str, BLOCK_N)
    ctx = (q, do, lse2, delta, k_src, v_src, rows, (b, h, len_q, len_k, offset), (left, right), terms,
           (head_hash, drop_threshold, drop_scale))  # fmt: skip
    (dq,) = walk(dq_tile, (tl.zeros([BLOCK_M, D_PAD], tl.float32),), ctx, bounds, lists, BLOCK_N, SPARSE_WALK, SPARSE,
                 ELEMENTWISE, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK,
                 SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, False)  # fmt: skip

    dq = dq * scale
    dq_ptrs = DQ + b64 * dq_str[0] + h64 * dq_str[2] + row64 * dq_str[1] + offs_m[:, None] * dq_str[1] + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
